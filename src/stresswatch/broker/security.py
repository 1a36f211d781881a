"""The security check the engine runs before it connects (:func:`check_broker_security`, pure:
the URL, the account and optionally the broker's mosquitto.conf) and its live counterpart
(:func:`check_broker_refuses_anonymous`, which connects without credentials).
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ConfigError, TransportError


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
    from ..mqtt import BrokerAddress, connect

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
