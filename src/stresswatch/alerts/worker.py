"""The support worker's client: subscribes to its own alerts topic and hands each alert,
once per ``alert_id``, to a callback (the CLI prints it); sends acks and resolutions.

Delivery is at-least-once, so the same alert can arrive twice (a re-send after an engine or
broker restart). The client remembers the ids it has shown, in memory and, with
``seen_path``, in a small SQLite file, so a duplicate is dropped even after the watch
client itself restarts. A later notice of the same alert (an escalation reminder) is not a
new alert: it goes to ``on_reminder``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from ..broker import private_client_id
from ..errors import StorageError, TransportError
from ..sqlite import connect as sqlite_connect
from ..model import Alert
from .acks import AckAction, AckMessage
from .lifecycle import Outcome
from .topics import Topics
from ..mqtt import connect


class SeenIds:
    """The ids (and highest notice) a worker has seen; SQLite-backed when given a path."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._mem: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            try:
                # paho calls back on its own thread: allow use from it, guarded by the client's lock.
                self._db = sqlite_connect(Path(path), any_thread=True)
                self._db.execute("CREATE TABLE IF NOT EXISTS seen (alert_id TEXT PRIMARY KEY, notice INTEGER, at TEXT)")
                self._mem = dict(self._db.execute("SELECT alert_id, notice FROM seen").fetchall())
            except (sqlite3.Error, OSError) as exc:
                raise StorageError(f"cannot open seen-alerts file: {exc}", path=path) from None

    def get(self, alert_id: str) -> int | None:
        return self._mem.get(alert_id)

    def put(self, alert_id: str, notice: int) -> None:
        self._mem[alert_id] = notice
        if self._db is not None:
            self._db.execute(
                "INSERT INTO seen (alert_id, notice, at) VALUES (?, ?, ?)"
                " ON CONFLICT(alert_id) DO UPDATE SET notice = excluded.notice",
                (alert_id, notice, datetime.now(timezone.utc).isoformat()),
            )

    def __len__(self) -> int:
        return len(self._mem)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


class WorkerClient:
    """A persistent MQTT session, so alerts sent while the worker was away arrive on return."""

    def __init__(
        self,
        url: str,
        worker: str,
        on_alert: Callable[[Alert], None],
        *,
        topics: Topics | None = None,
        username: str | None = None,
        password: str | None = None,
        protocol: str = "auto",
        on_invalid: Callable[[str, str], None] | None = None,
        on_reminder: Callable[[Alert], None] | None = None,
        on_connection: Callable[[bool], None] | None = None,
        on_refused: Callable[[TransportError], None] | None = None,
        seen_path: str | Path | None = None,
        session_expiry_s: int = 7 * 24 * 3600,
        client_id: str | None = None,
    ) -> None:
        self.worker = worker
        self.topics = topics or Topics()
        self.topic = self.topics.alerts(worker)
        self._on_alert = on_alert
        self._on_invalid = on_invalid
        self._on_reminder = on_reminder
        self._on_connection = on_connection
        self._seen = SeenIds(seen_path)
        self._lock = threading.Lock()
        self.received: list[Alert] = []
        self.duplicates = 0
        self._client = connect(
            url,
            # a session only the password's holder can take over (broker.private_client_id)
            client_id or private_client_id(f"stresswatch-worker-{worker}", password),
            username=username,
            password=password,
            protocol=protocol,
            persistent_session=True,
            session_expiry_s=session_expiry_s,
            on_message=self._message,
            on_reconnect=self._reconnected,
            on_refused=on_refused,  # a reconnect refused: e.g. the account was removed (NotAuthorised)
        )
        self._client.on_disconnect = self._disconnected
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.subscribe(self.topic, qos=1)
        if not subscribed.wait(10):
            self.close()
            raise TransportError(f"no SUBACK for {self.topic!r}", url=url)

    def _reconnected(self, client: mqtt.Client, session_present: bool) -> None:
        if not session_present:  # the broker lost our session (e.g. no persistence): subscribe again
            client.subscribe(self.topic, qos=1)
        if self._on_connection:
            self._on_connection(True)

    def _disconnected(self, *args: object) -> None:
        if self._on_connection:
            self._on_connection(False)

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            alert = Alert.model_validate(json.loads(msg.payload))
        except (ValueError, ValidationError) as exc:
            if self._on_invalid:
                self._on_invalid(msg.topic, str(exc).splitlines()[0])
            return
        with self._lock:
            seen = self._seen.get(alert.alert_id)
            if seen is not None and alert.notice <= seen:
                self.duplicates += 1
                return  # at-least-once delivery: a re-send keeps its id
            self._seen.put(alert.alert_id, alert.notice)
            if seen is None:
                self.received.append(alert)
        if seen is None:
            self._on_alert(alert)
        elif self._on_reminder:
            self._on_reminder(alert)

    def _send(self, msg: AckMessage, timeout_s: float) -> None:
        info = self._client.publish(self.topics.acks(self.worker), msg.encode(), qos=1)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"not acknowledged by the broker: {exc}") from None
        if not info.is_published():
            raise TransportError(f"not acknowledged by the broker within {timeout_s:g} s")

    def ack(self, alert_id: str, *, timeout_s: float = 10.0) -> None:
        """Tell the engine "I'm reaching out" (stops escalation)."""
        self._send(AckMessage(alert_id=alert_id, action=AckAction.ACK), timeout_s)

    def resolve(self, alert_id: str, outcome: Outcome, note: str | None = None, *, timeout_s: float = 10.0) -> None:
        self._send(AckMessage(alert_id=alert_id, action=AckAction.RESOLVE, outcome=outcome, note=note), timeout_s)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._seen.close()


def send_ack(
    url: str,
    worker: str,
    msg: AckMessage,
    *,
    topics: Topics | None = None,
    username: str | None = None,
    password: str | None = None,
    protocol: str = "auto",
    timeout_s: float = 10.0,
) -> None:
    """One-shot: publish an ack/resolve for ``worker`` and wait for the broker's PUBACK.

    Uses its own client id, so a running ``alerts watch`` session is not disturbed.
    """
    client = connect(url, f"stresswatch-worker-{worker}-ack", username=username, password=password, protocol=protocol)
    try:
        info = client.publish((topics or Topics()).acks(worker), msg.encode(), qos=1)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise TransportError(f"not acknowledged by the broker within {timeout_s:g} s", url=url)
    finally:
        client.disconnect()
        client.loop_stop()
