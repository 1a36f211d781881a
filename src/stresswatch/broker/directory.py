"""One broker's directory, as ``stresswatch broker config --out DIR`` writes it: the conf, the
``$7$`` password file, the ACL, persistence and the accounts it was rendered from. Every file
is replaced atomically (:func:`stresswatch.fsio.atomic_write`), one provisioning command at a
time (an advisory lock).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..fsio import atomic_write
from .accounts import Role, check_account_id, generate_password, hash_password
from ..wire.limits import MAX_PAYLOAD_BYTES
from .conf import PACKET_OVERHEAD_BYTES, TlsListener, mosquitto_conf, render_acl


@dataclass(frozen=True)
class BrokerDir:
    """``stresswatch broker config --out DIR``: ``mosquitto.conf`` (the alerts-and-consent
    broker), ``mosquitto-ingest.conf`` (the ingest broker), ``passwd`` and ``acl`` (shared by
    both), ``data/`` and ``data-ingest/`` (their persistence) and ``accounts.json`` (id -> role,
    the source of the ACL)."""

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
    def ingest_conf(self) -> Path:
        return self.path / "mosquitto-ingest.conf"

    @property
    def ingest_data(self) -> Path:
        return self.path / "data-ingest"

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
        max_packet_size_bytes: int = MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES,
        ingest_port: int | None = None,
        ingest_tls_port: int | None = None,
        ingest_broker: bool = True,
    ) -> None:
        """Write (or rewrite) the configuration; accounts already provisioned are kept.

        ``ingest_broker``: also write the ingest broker's conf, on ``ingest_port`` (default
        ``port + 1``) and, with TLS, ``ingest_tls_port`` (default the TLS port + 1); both
        brokers read the same password file and ACL. Without it an old ingest conf is removed
        and the one broker carries everything (saving after every change: ~300 messages/s).
        """
        root = self.path.resolve()
        if tls is not None:
            for name, f in (("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-ca", tls.ca)):
                if not f.is_file():
                    raise ConfigError("no such file", source=f, field=name)
            tls = TlsListener(tls.port, tls.cert.resolve(), tls.key.resolve(), tls.ca.resolve(), tls.host)
        common = dict(host=host, password_file=root / "passwd", acl_file=root / "acl", run_as=run_as, plaintext=plaintext,
                      max_packet_size_bytes=max_packet_size_bytes)  # fmt: skip
        conf = mosquitto_conf(port=port, data_dir=root / "data", tls=tls, role="alerts", **common)  # type: ignore[arg-type]
        ingest_conf = None
        if ingest_broker:
            iport = ingest_port if ingest_port is not None else port + 1
            itls = None if tls is None else TlsListener(ingest_tls_port or tls.port + 1, tls.cert, tls.key, tls.ca, tls.host)
            taken = {port} | ({tls.port} if tls else set())
            if (plaintext and iport in taken) or (itls is not None and itls.port in taken | {iport}):
                raise ConfigError("the ingest broker needs ports of its own (--ingest-port, --ingest-tls-port)", field="--ingest-port")
            ingest_conf = mosquitto_conf(port=iport, data_dir=root / "data-ingest", tls=itls, role="ingest", **common)  # type: ignore[arg-type]
        self.data.mkdir(parents=True, exist_ok=True)
        if ingest_conf is not None:
            self.ingest_data.mkdir(parents=True, exist_ok=True)
        with self._locked():
            accounts = self._accounts() if self.state.exists() else {}
            if not self.passwd.exists():
                atomic_write(self.passwd, "")
            self._save(prefix, accounts)
            atomic_write(self.conf, conf, mode=0o644)
            if ingest_conf is not None:
                atomic_write(self.ingest_conf, ingest_conf, mode=0o644)
            else:
                self.ingest_conf.unlink(missing_ok=True)

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
