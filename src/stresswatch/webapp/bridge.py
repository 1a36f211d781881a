"""One worker's MQTT session, bridged to the browser tabs signed in as that worker.

The server connects to the broker *as the worker* (their own account and password), so the
broker's ACL decides what the page can see and do, exactly as for ``stresswatch alerts``.
Events from paho's thread are handed to each open event stream (an asyncio queue on the
server's loop); the page asks the engine for the authoritative list whenever it (re)connects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..wire.acks import AckMessage
from ..alerts.replies import Reply
from ..alerts.topics import Topics
from ..alerts.worker import WorkerClient
from ..broker import private_client_id
from ..model import Alert

LIVE, RECONNECTING, SIGNED_OUT = "live", "reconnecting", "signed_out"


@dataclass
class Event:
    kind: str  # "connection" | "alert" | "update"
    data: dict[str, Any]

    def sse(self) -> str:
        return f"event: {self.kind}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"


def alert_event(alert: Alert) -> dict[str, Any]:
    """What the page gets of a live alert: what the person allowed, never a score or a sample."""
    return alert.model_dump(mode="json", exclude={"score", "schema_version", "episode_start"}, exclude_none=True)


@dataclass
class WorkerBridge:
    url: str
    worker: str
    password: str
    state_dir: Path
    topics: Topics = field(default_factory=Topics)
    protocol: str = "auto"
    on_signed_out: Callable[[WorkerBridge], None] | None = None
    connection: str = LIVE
    engine: str = "unknown"  # the engine's retained status: online / offline
    _subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: WorkerClient | None = None

    def connect(self) -> WorkerBridge:
        """Connect as the worker; :class:`TransportError` if the broker refuses (wrong password)."""
        self._client = WorkerClient(
            self.url,
            self.worker,
            lambda a: self._emit(Event("alert", alert_event(a))),
            topics=self.topics,
            username=self.worker,
            password=self.password,
            protocol=self.protocol,
            on_reminder=lambda a: self._emit(Event("alert", alert_event(a))),
            on_reply=lambda r: self._emit(Event("update", r.model_dump(mode="json", exclude_none=True))) if r.alert else None,
            on_connection=self._connection,
            on_refused=self._refused,
            on_engine_status=self._engine_status,
            seen_path=self.state_dir / f"webapp-{self.worker}-seen.sqlite",
            client_id=private_client_id(f"stresswatch-webapp-{self.worker}", self.password),
        )
        return self

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(self.password.encode(), password.encode())

    # -- paho's thread -------------------------------------------------------------------
    def _connection(self, up: bool) -> None:
        if self.connection == SIGNED_OUT:
            return
        self.connection = LIVE if up else RECONNECTING
        self._emit(Event("connection", {"state": self.connection}))

    def _engine_status(self, status: str) -> None:
        self.engine = status
        self._emit(Event("engine", {"state": status}))

    def _refused(self, why: str) -> None:
        self.connection = SIGNED_OUT
        self._emit(Event("connection", {"state": SIGNED_OUT, "reason": "account_removed", "detail": why}))
        if self.on_signed_out:
            self.on_signed_out(self)

    def _emit(self, ev: Event) -> None:
        with self._lock:
            subs = list(self._subscribers)
        for loop, q in subs:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # that stream's loop is gone
                self.unsubscribe(loop, q)

    # -- the server's loop ---------------------------------------------------------------
    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]:
        sub = (asyncio.get_running_loop(), asyncio.Queue[Event]())
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Event]) -> None:
        with self._lock:
            self._subscribers.discard((loop, q))

    def request(self, msg: AckMessage, timeout_s: float = 10.0) -> Reply:
        """Blocking (run it in a worker thread): the engine's reply to ``msg``."""
        assert self._client is not None
        return self._client.request(msg, timeout_s=timeout_s)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __hash__(self) -> int:
        return id(self)
