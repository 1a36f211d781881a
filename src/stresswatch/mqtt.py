"""The one MQTT client factory: every paho client of the project is built here.

One meaning for each choice, whoever connects (engine, worker client, companion, CLI):

* **Address**: ``mqtt://[user[:password]@]HOST[:PORT]`` or ``mqtts://...[?cafile=/path/ca.pem]``
  (:class:`BrokerAddress`; printing it never shows credentials).
* **Protocol** ``"auto"``: MQTT 5, and MQTT 3.1.1 when the broker refuses version 5 (the
  embedded amqtt broker of the demo speaks only 3.1.1). ``"5"`` or ``"3.1.1"`` force one.
* **TLS** for ``mqtts://``: the server certificate is checked against the URL's ``cafile``
  (a private CA) or the ``ca_file`` argument, else the system's CAs.
* **Credentials**, first found wins: the URL's ``user:password@``; the ``username`` /
  ``password`` arguments (the CLI passes the settings ``mqtt.username`` / ``mqtt.password``,
  which also come from ``STRESSWATCH_MQTT__USERNAME`` / ``STRESSWATCH_MQTT__PASSWORD``); the
  first line of ``password_file`` (setting ``mqtt.password_file``). A broker that refuses
  them raises :class:`NotAuthorised`, saying so and how to pass them.
* **Reconnect**: after a lost connection paho reconnects by itself, backing off from 1 s to
  ``reconnect_max_s``; ``on_reconnect(client, session_present)`` runs after each success and
  ``on_refused(error)`` when a reconnect is refused (an account removed meanwhile).
* **Client id**: given by the caller; for persistent sessions use
  :func:`stresswatch.broker.private_client_id` so nobody else can take the session over.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import read_password_file
from .errors import ConfigError, TransportError

log = logging.getLogger(__name__)

PROTOCOLS: dict[str, list[int]] = {"auto": [mqtt.MQTTv5, mqtt.MQTTv311], "5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311]}

# CONNACK reasons that mean "these credentials are not accepted" (MQTT 5 0x86/0x87; paho maps
# the 3.1.1 return codes 4 and 5 onto the same names).
_AUTH_REFUSALS = ("not authorized", "bad user name or password")

CREDENTIALS_HINT = (
    "pass the account as mqtt://USER:PASSWORD@HOST, or set mqtt.username with mqtt.password or "
    "mqtt.password_file (environment: STRESSWATCH_MQTT__USERNAME, STRESSWATCH_MQTT__PASSWORD, "
    "STRESSWATCH_MQTT__PASSWORD_FILE); docs/BROKER.md"
)


class NotAuthorised(TransportError):
    """The broker refused the account (wrong or missing password, unknown or removed account)."""

    exit_code = 77  # EX_NOPERM


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    ca_file: str | None = None  # TLS: trust this CA (PEM) instead of the system's

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt://[user[:password]@]HOST[:PORT]`` or ``mqtts://...[?cafile=/path/ca.pem]``."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise TransportError("expected mqtt://HOST:PORT or mqtts://HOST:PORT", url=_without_secrets(url))
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise TransportError("invalid port", url=_without_secrets(url)) from None
        query = parse_qs(parts.query)
        ca_file = query.get("cafile", [None])[-1]
        if ca_file and not tls:
            raise TransportError("cafile is for TLS: use mqtts://", url=_without_secrets(url))
        return cls(
            parts.hostname,
            port,
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            ca_file,
        )

    def __str__(self) -> str:  # never print credentials
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _without_secrets(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None

    @classmethod
    def resolve(
        cls,
        addr: BrokerAddress,
        username: str | None = None,
        password: str | None = None,
        password_file: str | Path | None = None,
    ) -> Credentials:
        """URL first, then the arguments, then the password file (see the module docstring)."""
        if addr.username:
            return cls(addr.username, addr.password if addr.password is not None else password)
        if password is None and password_file is not None:
            try:
                password = read_password_file(Path(password_file))
            except ValueError as exc:
                raise ConfigError(str(exc), field="mqtt.password_file") from None
        return cls(username or None, password)


def refusal(rc: object, addr: BrokerAddress, creds: Credentials) -> TransportError:
    reason = str(rc)
    if reason.lower() in _AUTH_REFUSALS:
        who = f"the account {creds.username!r}" if creds.username else "a client without an account"
        return NotAuthorised(f"not authorised: the broker refused {who} ({reason}); {CREDENTIALS_HINT}", url=str(addr))
    return TransportError(f"connection refused: {reason}", url=str(addr))


def _new_client(
    version: int,
    client_id: str,
    addr: BrokerAddress,
    creds: Credentials,
    *,
    ca_file: str | None,
    persistent_session: bool,
    will: tuple[str, bytes] | None,
    reconnect_max_s: float,
    manual_ack: bool = False,
) -> mqtt.Client:
    kwargs: dict[str, object] = {}
    if version == mqtt.MQTTv311:
        kwargs["clean_session"] = not persistent_session
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version, manual_ack=manual_ack, **kwargs)  # type: ignore[arg-type]
    if creds.username:
        client.username_pw_set(creds.username, creds.password)
    if addr.tls:
        try:
            client.tls_set(ca_certs=ca_file)
        except (OSError, ValueError) as exc:  # unreadable or not a PEM CA file
            raise TransportError(f"TLS CA file {ca_file}: {exc}", url=str(addr)) from None
    if will:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(reconnect_max_s)))
    return client


def connect(
    url: str,
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    password_file: str | Path | None = None,
    protocol: str = "auto",
    persistent_session: bool = False,
    session_expiry_s: int = 7 * 24 * 3600,
    keepalive_s: int = 30,
    timeout_s: float = 10.0,
    will: tuple[str, bytes] | None = None,
    on_message: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None] | None = None,
    on_reconnect: Callable[[mqtt.Client, bool], None] | None = None,
    on_refused: Callable[[TransportError], None] | None = None,
    ca_file: str | None = None,
    reconnect_max_s: float = 5.0,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A connected paho client with its network loop running, or :class:`TransportError`
    (:class:`NotAuthorised` when the broker refuses the account).

    ``persistent_session`` keeps subscriptions and queued QoS 1 messages across reconnects
    (MQTT 5: clean start off with a session expiry; 3.1.1: clean session off).
    ``manual_ack``: a received QoS 1 message is acknowledged only by ``client.ack(mid, qos)``
    (the engine's ingest: PUBACK once the batch is durable).
    """
    if protocol not in PROTOCOLS:
        raise TransportError(f"unknown MQTT protocol {protocol!r}: use auto, 5 or 3.1.1")
    addr = BrokerAddress.parse(url)
    ca_file = ca_file or addr.ca_file
    creds = Credentials.resolve(addr, username, password, password_file)
    error: TransportError = TransportError("no answer", url=str(addr))
    for version in PROTOCOLS[protocol]:
        client = _new_client(
            version, client_id, addr, creds, ca_file=ca_file, persistent_session=persistent_session, will=will,
            reconnect_max_s=reconnect_max_s, manual_ack=manual_ack,
        )  # fmt: skip
        if on_message is not None:
            client.on_message = on_message
        done = threading.Event()
        result: list[object] = []

        def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
            result.append(rc)
            done.set()

        client.on_connect = on_connect
        connect_kwargs: dict[str, object] = {"keepalive": keepalive_s}
        if version == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if persistent_session:
                props.SessionExpiryInterval = session_expiry_s
            connect_kwargs["clean_start"] = not persistent_session
            connect_kwargs["properties"] = props
        try:
            client.connect(addr.host, addr.port, **connect_kwargs)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect: {exc}", url=str(addr)) from None
        client.loop_start()
        if not done.wait(timeout_s):
            client.loop_stop()
            client.disconnect()
            raise TransportError(f"no CONNACK within {timeout_s:g} s", url=str(addr))
        rc = result[0]
        if not getattr(rc, "is_failure", False):
            client.on_connect = _after_connect(addr, creds, on_reconnect, on_refused)
            return client
        client.loop_stop()
        client.disconnect()
        error = refusal(rc, addr, creds)
        if "protocol" not in str(rc).lower():
            break  # refused for a reason other than the version: do not retry with another
    raise error


def _after_connect(
    addr: BrokerAddress,
    creds: Credentials,
    on_reconnect: Callable[[mqtt.Client, bool], None] | None,
    on_refused: Callable[[TransportError], None] | None,
) -> Callable[..., None]:
    def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        if getattr(rc, "is_failure", False):
            error = refusal(rc, addr, creds)
            if on_refused is not None:
                on_refused(error)
            else:
                log.warning("%s", error)
        elif on_reconnect is not None:
            on_reconnect(c, bool(getattr(flags, "session_present", False)))

    return on_connect


class BackgroundConnection:
    """:func:`connect` retried in a thread until the broker answers, for a client that must
    start while the broker may be away (the companion keeps buffering on disk meanwhile).

    ``on_connected(client)`` runs once, on this thread, with the connected client; after that
    paho's own reconnect takes over. A refusal of the account stops the retries and is kept
    in :attr:`error` (and passed to ``on_refused``): retrying a wrong password changes nothing.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        on_connected: Callable[[mqtt.Client], None],
        *,
        retry_max_s: float = 5.0,
        on_refused: Callable[[TransportError], None] | None = None,
        **connect_kwargs: object,
    ) -> None:
        self.addr = BrokerAddress.parse(url)
        self.error: TransportError | None = None
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()

        def run() -> None:
            delay_s = 0.5
            while not self._stop.is_set():
                try:
                    client = connect(url, client_id, on_refused=on_refused, reconnect_max_s=retry_max_s, **connect_kwargs)  # type: ignore[arg-type]
                except NotAuthorised as exc:
                    self.error = exc
                    if on_refused is not None:
                        on_refused(exc)
                    return
                except TransportError as exc:
                    log.debug("broker not reachable yet: %s", exc)
                    self._stop.wait(delay_s)
                    delay_s = min(delay_s * 2, retry_max_s)
                    continue
                with self._lock:
                    if self._stop.is_set():  # closed while connecting
                        client.disconnect()
                        client.loop_stop()
                        return
                    self._client = client
                on_connected(client)
                return

        self._thread = threading.Thread(target=run, name=f"mqtt-connect-{client_id}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._thread.join(15)


__all__ = [
    "BackgroundConnection",
    "BrokerAddress",
    "CREDENTIALS_HINT",
    "Credentials",
    "NotAuthorised",
    "PROTOCOLS",
    "connect",
]
