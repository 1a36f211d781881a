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
from ..wire.acks import AckAction, AckMessage
from .lifecycle import Outcome
from .replies import Reply, ReplyWaiter, wait_published
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
        on_reply: Callable[[Reply], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        on_engine_status: Callable[[str], None] | None = None,
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
        self._on_reply = on_reply
        self._on_refused = on_refused
        self.replies_topic = self.topics.replies(worker)
        self._on_engine_status = on_engine_status
        # retained "online"/"offline" of the engine (its last will): only for a caller that shows it
        self._subscriptions = [(self.topic, 1), (self.replies_topic, 1)]
        if on_engine_status is not None:
            self._subscriptions.append((self.topics.engine_status, 1))
        self._waiter = ReplyWaiter()
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
        )
        self._client.on_disconnect = self._disconnected
        subscribed = threading.Event()
        granted: list[object] = []

        def on_subscribe(c: object, u: object, mid: int, codes: list[object], props: object = None) -> None:
            granted.extend(codes)
            subscribed.set()

        self._client.on_subscribe = on_subscribe
        self._client.subscribe(self._subscriptions)
        if not subscribed.wait(10):
            self.close()
            raise TransportError(f"no SUBACK for {self.topic!r}", url=url)
        if any(getattr(code, "is_failure", False) or code == 128 for code in granted):
            self.close()
            raise TransportError(f"the broker does not let this account read {self.topic!r}: not {worker}'s worker account")
        self._client.on_connect = self._connected

    def _connected(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        if getattr(rc, "is_failure", False):
            # The broker refuses the account now (removed, or its password changed): retrying
            # forever would only repeat that, so stop and say so.
            client.disconnect()
            threading.Thread(target=client.loop_stop, daemon=True).start()
            if self._on_refused:
                self._on_refused(str(rc))
            return
        self._reconnected(client, bool(getattr(flags, "session_present", False)))

    def _reconnected(self, client: mqtt.Client, session_present: bool) -> None:
        if not session_present:  # the broker lost our session (e.g. no persistence): subscribe again
            client.subscribe(self._subscriptions)
        if self._on_connection:
            self._on_connection(True)

    def _disconnected(self, *args: object) -> None:
        if self._on_connection:
            self._on_connection(False)

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.engine_status:
            if self._on_engine_status is not None:
                try:
                    status = json.loads(msg.payload).get("status")
                except (ValueError, AttributeError, UnicodeDecodeError):
                    status = None
                self._on_engine_status(status if status in ("online", "offline") else "unknown")
            return
        if msg.topic == self.replies_topic:
            reply = self._waiter.feed(msg.payload)
            if reply is not None and self._on_reply:
                self._on_reply(reply)
            return
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
        wait_published(self._client.publish(self.topics.acks(self.worker), msg.encode(), qos=1), timeout_s)

    def request(self, msg: AckMessage, *, timeout_s: float = 10.0) -> Reply:
        """Send an ack, resolve or list request and return the engine's :class:`Reply`."""
        rid = self._waiter.expect()
        self._send(msg.model_copy(update={"request_id": rid}), timeout_s)
        return self._waiter.wait(rid, timeout_s)

    def ack(self, alert_id: str, *, timeout_s: float = 10.0) -> None:
        """Tell the engine "I'm reaching out" (stops escalation)."""
        self._send(AckMessage(alert_id=alert_id, action=AckAction.ACK), timeout_s)

    def resolve(self, alert_id: str, outcome: Outcome, note: str | None = None, *, timeout_s: float = 10.0) -> None:
        self._send(AckMessage(alert_id=alert_id, action=AckAction.RESOLVE, outcome=outcome, note=note), timeout_s)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._seen.close()

