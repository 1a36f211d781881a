"""Brokers: an embedded amqtt broker for first runs, and the project's Mosquitto broker.

The embedded broker speaks MQTT 3.1.1 only and runs in its own thread with its own event
loop, so synchronous code (paho clients) can use it. Production uses Mosquitto (SPEC "Real
components"): :func:`mosquitto_conf` writes the settings measured to matter,
:func:`render_acl` the access rules of SPEC's topic table, :class:`BrokerDir` keeps the
password file and accounts of one broker, and :func:`check_broker_security` is the check the
engine runs before it starts. docs/BROKER.md explains the choices.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError, TransportError
from .wire.ids import ID_RULE, is_valid_id
from .wire.limits import MAX_PAYLOAD_BYTES


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """amqtt on a free loopback port; ``with EmbeddedBroker() as b: b.url``."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: object | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        ready = threading.Event()
        failure: list[BaseException] = []
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Loopback only, for the demo and first runs: anonymous is acceptable here.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())  # type: ignore[attr-defined]
            except BaseException as exc:  # reported to the caller below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or failure:
            raise TransportError(f"embedded broker did not start: {failure[0] if failure else 'timeout'}", url=self.url)
        return self

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)  # type: ignore[attr-defined]
        try:
            fut.result(10)
        except Exception:  # noqa: BLE001 - shutting down; nothing left to save
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener from certificates the operator supplies (paths as mosquitto reads them)."""

    port: int
    cert: Path
    key: Path
    ca: Path
    host: str = "127.0.0.1"


# Fixed header, topic (prefix + level + id) and MQTT 5 properties of one PUBLISH around its payload.
PACKET_OVERHEAD_BYTES = 64 * 1024


def mosquitto_conf(
    *,
    port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    allow_anonymous: bool = False,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    run_as: str | None = None,
    tls: TlsListener | None = None,
    plaintext: bool = True,
) -> str:
    """A mosquitto.conf for our broker. The limits are deliberate (SPEC "broker facts"):

    * ``max_queued_messages 0`` (unlimited): the default 1000 dropped 15 % of a QoS 1 stream
      to a subscriber that fell behind;
    * ``autosave_on_changes`` with ``autosave_interval 1``: default persistence lost every
      queued message on SIGKILL;
    * ``persistent_client_expiration``: offline workers keep their queue for a week;
    * ``message_size_limit`` = the largest legitimate payload of any message
      (:data:`stresswatch.wire.limits.MAX_PAYLOAD_BYTES`, computed from the message caps; see
      docs/BROKER.md): a larger publish is refused, neither forwarded nor retained;
      ``max_packet_size`` a little above it disconnects a client sending far more.

    ``tls`` adds a TLS listener (TLS 1.2 or later); ``plaintext=False`` leaves it the only one.
    """
    if not plaintext and tls is None:
        raise ConfigError("a broker needs at least one listener: keep the plaintext one or give TLS certificates")
    lines = [
        "# Written by stresswatch. See docs/BROKER.md.",
        "per_listener_settings false",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_on_changes true",
        "autosave_interval 1",
        "max_queued_messages 0",
        "max_inflight_messages 100",
        "persistent_client_expiration 7d",
        f"message_size_limit {MAX_PAYLOAD_BYTES}",
        f"max_packet_size {MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    if password_file:
        lines.append(f"password_file {password_file}")
    if acl_file:
        lines.append(f"acl_file {acl_file}")
    if plaintext:
        lines += ["", f"listener {port} {host}"]
    if tls is not None:
        lines += [
            "",
            f"listener {tls.port} {tls.host}",
            f"cafile {tls.ca}",
            f"certfile {tls.cert}",
            f"keyfile {tls.key}",
            "tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n"


# -- accounts: ids, roles, password hashes ---------------------------------------------------


class Role(str, enum.Enum):
    """What an account may do; the ACL (:func:`render_acl`) spells it out per topic."""

    USER = "user"
    WORKER = "worker"
    ENGINE = "engine"


DEFAULT_ENGINE_ID = "stresswatch-engine"
_ID_MAX_LEN = 128


def check_account_id(value: str, role: Role | str = "account") -> str:
    """An id is a broker username *and* a topic level (``%u`` in the ACL), so it must be
    non-empty and free of ``+ # /`` (wildcards and separators), control characters, ``:``
    (the password file's separator) and white space (the ACL file's separator)."""
    kind = role.value if isinstance(role, Role) else role
    if not value:
        raise ConfigError(f"{kind} id must not be empty", field="id")
    if len(value) > _ID_MAX_LEN:
        raise ConfigError(f"{kind} id is longer than {_ID_MAX_LEN} characters", field="id")
    for c in value:
        if c in "+#/":
            why = f"contains {c!r} (an MQTT wildcard or topic separator)"
        elif ord(c) < 32 or 127 <= ord(c) < 160:
            why = f"contains the control character U+{ord(c):04X}"
        elif c == ":":
            why = "contains ':' (the password file separator)"
        elif c.isspace():
            why = "contains white space"
        else:
            continue
        raise ConfigError(f"{kind} id {value!r} {why}; use letters, digits, '-', '_' or '.'", field="id")
    if not is_valid_id(value):  # the one id grammar (stresswatch.wire.ids), which topics use too
        raise ConfigError(f"{kind} id {value!r} must be {ID_RULE}", field="id")
    return value


# mosquitto 2.0 ``$7$`` hashes: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte key, base64.
# mosquitto_passwd defaults to 101 iterations; 1,000 costs the broker about 2 ms per CONNECT
# (measured here) and stretches an operator-chosen password tenfold. Generated passwords have
# 192 random bits, for which stretching adds nothing.
PBKDF2_ITERATIONS = 1000


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """The password-file field mosquitto 2.0 verifies (``$7$iterations$salt$hash``)."""
    if not password:
        raise ConfigError("password must not be empty", field="password")
    salt = salt if salt is not None else secrets.token_bytes(12)
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches a ``$7$`` field (constant-time comparison)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt, key = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(key))
    return hmac.compare_digest(got, key)


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def private_client_id(base: str, password: str | None) -> str:
    """``base`` plus a tag derived from the account's password, for persistent sessions.

    Mosquitto 2.0.11 lets any authenticated account connect with any client id, and a
    CONNECT with an existing id takes that session over: measured here, a user connecting as
    ``stresswatch-worker-sam`` wiped sam's queued alerts and subscription (the ACL kept the
    alerts from the intruder, but sam never received them). A client id nobody can guess
    without the password closes that hole while staying stable across restarts, so the
    session (and its queue) is found again on reconnect. Without a password: ``base``.
    """
    if not password:
        return base
    tag = hashlib.sha256(b"stresswatch-client-id\x00" + password.encode("utf-8")).hexdigest()[:16]
    return f"{base}-{tag}"


# -- the ACL --------------------------------------------------------------------------------


def render_acl(prefix: str, accounts: Mapping[str, Role]) -> str:
    """Mosquitto's default ACL for SPEC's topic table.

    ``pattern`` lines apply to every authenticated account with ``%u`` replaced by its
    username, so they state the user and worker rights once. Mosquitto 2.0 has no groups and
    a pattern cannot name a role, so each user or worker also gets a ``user`` block that
    *denies* the other role's topics under its own id (a ``deny`` in a user block wins over a
    pattern; tested against the real broker). The engine's block grants the wildcards.
    """
    p = prefix
    lines = [
        "# Written by stresswatch (docs/BROKER.md). Regenerated by `stresswatch broker add-*`:",
        "# edit the accounts with those commands, not here.",
        "#",
        "# Every authenticated account; %u is its username (its user or worker id).",
        f"pattern read {p}/engine/status",
        "# a support worker: its own alerts and the engine's replies in, its acks (and list requests) out",
        f"pattern read {p}/alerts/%u",
        f"pattern write {p}/acks/%u",
        f"pattern read {p}/replies/%u",
        "# a service user: its own samples, consent and check-ins out, its status in",
        f"pattern write {p}/ingest/%u",
        f"pattern write {p}/consent/%u",
        f"pattern read {p}/status/%u",
        f"pattern write {p}/checkin/%u",
    ]
    for account_id in sorted(accounts):
        role = Role(accounts[account_id])
        check_account_id(account_id, role)
        lines += ["", f"# {role.value}", f"user {account_id}"]
        if role is Role.ENGINE:
            lines += [
                f"topic read {p}/ingest/+",
                # readwrite: `stresswatch erase` clears a user's retained consent through the engine
                f"topic readwrite {p}/consent/+",
                f"topic read {p}/acks/+",
                f"topic write {p}/replies/+",
                f"topic read {p}/checkin/+",
                f"topic write {p}/alerts/+",
                f"topic readwrite {p}/status/+",
                f"topic readwrite {p}/engine/status",
            ]
        elif role is Role.WORKER:
            lines += [f"topic deny {p}/{t}/{account_id}" for t in ("ingest", "consent", "status", "checkin")]
        else:
            lines += [f"topic deny {p}/{t}/{account_id}" for t in ("alerts", "acks", "replies")]
    return "\n".join(lines) + "\n"


# -- one broker's directory -----------------------------------------------------------------


def atomic_write(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a
    half-written one (temporary file in the same directory, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class BrokerDir:
    """``stresswatch broker config --out DIR``: ``mosquitto.conf``, ``passwd``, ``acl``,
    ``data/`` (persistence) and ``accounts.json`` (id -> role, the source of the ACL)."""

    path: Path

    @property
    def conf(self) -> Path:
        return self.path / "mosquitto.conf"

    @property
    def passwd(self) -> Path:
        return self.path / "passwd"

    @property
    def acl(self) -> Path:
        return self.path / "acl"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def state(self) -> Path:
        return self.path / "accounts.json"

    def write_config(
        self,
        *,
        port: int = 1883,
        host: str = "127.0.0.1",
        prefix: str = "stresswatch/v1",
        tls: TlsListener | None = None,
        plaintext: bool = True,
        run_as: str | None = None,
    ) -> None:
        """Write (or rewrite) the configuration; accounts already provisioned are kept."""
        root = self.path.resolve()
        if tls is not None:
            for name, f in (("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-ca", tls.ca)):
                if not f.is_file():
                    raise ConfigError("no such file", source=f, field=name)
            tls = TlsListener(tls.port, tls.cert.resolve(), tls.key.resolve(), tls.ca.resolve(), tls.host)
        conf = mosquitto_conf(
            port=port,
            host=host,
            data_dir=root / "data",
            password_file=root / "passwd",
            acl_file=root / "acl",
            run_as=run_as,
            tls=tls,
            plaintext=plaintext,
        )
        self.data.mkdir(parents=True, exist_ok=True)
        with self._locked():
            accounts = self._accounts() if self.state.exists() else {}
            if not self.passwd.exists():
                atomic_write(self.passwd, "")
            self._save(prefix, accounts)
            atomic_write(self.conf, conf, mode=0o644)

    # accounts

    def _load(self) -> tuple[str, dict[str, Role]]:
        try:
            raw = json.loads(self.state.read_text(encoding="utf-8"))
            return str(raw["prefix"]), {k: Role(v) for k, v in raw["accounts"].items()}
        except FileNotFoundError:
            raise ConfigError(
                f"no broker configuration here: run `stresswatch broker config --out {self.path}` first", source=self.state
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"not a stresswatch accounts file: {exc}", source=self.state) from None

    def _accounts(self) -> dict[str, Role]:
        return self._load()[1]

    @property
    def prefix(self) -> str:
        return self._load()[0]

    def accounts(self) -> dict[str, Role]:
        return dict(sorted(self._accounts().items()))

    def _save(self, prefix: str, accounts: Mapping[str, Role]) -> None:
        # ACL first: an account in the password file is never without its deny lines.
        atomic_write(self.acl, render_acl(prefix, accounts), mode=0o644)
        state = {"prefix": prefix, "accounts": {k: v.value for k, v in sorted(accounts.items())}}
        atomic_write(self.state, json.dumps(state, indent=2) + "\n")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One provisioning command at a time per directory (no lost update of the files)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; provisioning is an operator's act
            yield
            return
        if not self.path.is_dir():  # nothing to protect yet (write_config creates it)
            yield
            return
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _passwd_lines(self) -> list[str]:
        try:
            return [ln for ln in self.passwd.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except FileNotFoundError:
            return []

    def add(self, role: Role, account_id: str, password: str | None = None, *, replace: bool = False) -> str:
        """Provision ``account_id`` with ``role``; returns the password (generated unless given).

        An id names one account, so a user and a worker cannot share an id. ``replace`` sets a
        new password for an existing account of the same role.
        """
        check_account_id(account_id, role)
        password = password if password is not None else generate_password()
        entry = f"{account_id}:{hash_password(password)}"
        with self._locked():
            prefix, accounts = self._load()
            existing = accounts.get(account_id)
            if existing is not None and (existing is not role or not replace):
                hint = " (use --replace to set a new password)" if existing is role else ""
                raise ConfigError(f"{account_id!r} is already provisioned as a {existing.value}{hint}", field="id")
            lines = [ln for ln in self._passwd_lines() if ln.split(":", 1)[0] != account_id] + [entry]
            self._save(prefix, {**accounts, account_id: role})
            atomic_write(self.passwd, "\n".join(lines) + "\n")
        return password

    def remove(self, account_id: str) -> Role:
        with self._locked():
            prefix, accounts = self._load()
            if account_id not in accounts:
                raise ConfigError(f"no account {account_id!r}", field="id")
            role = accounts.pop(account_id)
            lines = [ln for ln in self._passwd_lines() if ln.split(":", 1)[0] != account_id]
            atomic_write(self.passwd, "".join(ln + "\n" for ln in lines))
            self._save(prefix, accounts)
        return role


# -- the engine's check ---------------------------------------------------------------------


def is_loopback_host(host: str | None) -> bool:
    """``None`` (no bind address) means every interface."""
    if host is None:
        return False
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ListenerFacts:
    port: int
    bind: str | None  # None: every interface
    tls: bool
    allow_anonymous: bool
    line: int

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.bind) or (self.port == 0 and self.bind is not None)  # port 0: a unix socket


def parse_mosquitto_conf(text: str, source: str | Path = "mosquitto.conf") -> list[ListenerFacts]:
    """The listeners of a mosquitto.conf and whether each lets anonymous clients in.

    Follows mosquitto 2.0's rules: ``allow_anonymous`` defaults to false; with
    ``per_listener_settings false`` (the default) it is global, otherwise it belongs to the
    listener above it; a configuration without any listener runs a loopback-only default
    listener on 1883 that allows anonymous clients (mosquitto's "local only mode").
    Raises :class:`ConfigError` naming the line for a value it cannot read.
    """
    per_listener = False
    global_anon: bool | None = None
    listeners: list[dict[str, object]] = []
    legacy_port: int | None = None
    legacy_bind: str | None = None
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *args = line.split()
        try:
            if key == "per_listener_settings":
                per_listener = _bool(args[0])
            elif key == "listener":
                listeners.append({"port": int(args[0]), "bind": args[1] if len(args) > 1 else None, "tls": False, "anon": None, "line": n})
            elif key == "port":
                legacy_port = int(args[0])
            elif key == "bind_address":
                legacy_bind = args[0]
            elif key == "bind_interface" and listeners:
                listeners[-1]["bind"] = "127.0.0.1" if args[0] == "lo" else f"interface {args[0]}"
            elif key in ("certfile", "psk_hint") and listeners:
                listeners[-1]["tls"] = True
            elif key == "allow_anonymous":
                value = _bool(args[0])
                if per_listener and listeners:
                    listeners[-1]["anon"] = value
                else:
                    global_anon = value
        except (IndexError, ValueError):
            raise ConfigError(f"line {n}: cannot read {line!r}", source=source) from None
    if legacy_port is not None or legacy_bind is not None:
        listeners.insert(0, {"port": legacy_port or 1883, "bind": legacy_bind, "tls": False, "anon": None, "line": 0})
    if not listeners:
        return [ListenerFacts(1883, "127.0.0.1", False, global_anon if global_anon is not None else True, 0)]
    return [
        ListenerFacts(
            int(str(li["port"])),
            li["bind"] if isinstance(li["bind"], str) else None,
            bool(li["tls"]),
            bool(li["anon"] if li["anon"] is not None else (global_anon or False)),
            int(str(li["line"])),
        )
        for li in listeners
    ]


def _bool(word: str) -> bool:
    if word.lower() in ("true", "1", "yes", "on"):
        return True
    if word.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(word)


def _read_conf(conf: Path) -> str:
    """The file and any ``include_dir`` it names (``*.conf`` in name order, as mosquitto does)."""
    try:
        text = conf.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=conf) from None
    parts = [text]
    for line in text.splitlines():
        key, _, rest = line.strip().partition(" ")
        if key == "include_dir" and rest.strip():
            d = Path(rest.strip())
            d = d if d.is_absolute() else conf.parent / d
            parts += [f.read_text(encoding="utf-8") for f in sorted(d.glob("*.conf"))]
    return "\n".join(parts)


def check_broker_security(
    url: str,
    username: str | None = None,
    tls: bool | None = None,
    conf: Path | None = None,
) -> None:
    """Refuse (:class:`ConfigError`) to run the engine against an open broker.

    * ``url`` on a non-loopback host with no ``username``: the engine would connect
      anonymously, so the broker lets anyone in; refused.
    * ``conf`` (the broker's mosquitto.conf, when the operator gives it): any listener that is
      not loopback-only and allows anonymous clients is refused, naming the line.

    ``tls`` defaults to the URL's scheme (``mqtts``); it is recorded in the message to help
    the operator, and plaintext with credentials is allowed (docs/BROKER.md: prefer TLS off
    loopback). No network I/O: call it before connecting (``Engine.start`` does).
    """
    parts = urlsplit(url)
    host = parts.hostname
    username = username or (parts.username or None)
    tls = (parts.scheme == "mqtts") if tls is None else tls
    if not is_loopback_host(host) and not username:
        raise ConfigError(
            f"refusing to run against {parts.scheme}://{host}:{parts.port or (8883 if tls else 1883)} without "
            "credentials: a broker off loopback must require a password (stresswatch broker config; "
            "set mqtt.username and mqtt.password)",
            field="mqtt.username",
        )
    if conf is not None:
        for li in parse_mosquitto_conf(_read_conf(conf), conf):
            if li.allow_anonymous and not li.loopback:
                where = f"listener {li.port} on {li.bind or 'every interface'}"
                raise ConfigError(
                    f"{where} (line {li.line}) allows anonymous clients: set allow_anonymous false "
                    "and a password_file (stresswatch broker config writes both)",
                    source=conf,
                )


def check_broker_refuses_anonymous(url: str, *, timeout_s: float = 5.0, off_loopback_only: bool = True) -> None:
    """The live counterpart of :func:`check_broker_security` (network I/O): connect to the
    broker *without* credentials and raise :class:`ConfigError` if it lets us in.

    This catches a broker that allows anonymous clients even though the engine itself has an
    account. Loopback brokers are not probed unless ``off_loopback_only`` is false (the demo's
    embedded broker is anonymous on loopback by design). A broker that cannot be reached
    raises :class:`TransportError`, as connecting would.
    """
    from .alerts.transport import BrokerAddress, connect

    addr = BrokerAddress.parse(url)
    if off_loopback_only and is_loopback_host(addr.host):
        return
    anonymous = f"{addr.host}:{addr.port}"
    query = f"?cafile={addr.ca_file}" if addr.ca_file else ""
    probe_url = f"{'mqtts' if addr.tls else 'mqtt'}://{anonymous}{query}"
    try:
        client = connect(probe_url, f"stresswatch-probe-{secrets.token_hex(6)}", timeout_s=timeout_s)
    except TransportError as exc:
        if "refused" in str(exc):
            return
        raise
    client.disconnect()
    client.loop_stop()
    raise ConfigError(
        f"the broker at {addr} accepts clients without a password: refusing to send health alerts "
        "through it (set allow_anonymous false; stresswatch broker config)",
        field="mqtt.url",
    )
