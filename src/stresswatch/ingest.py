"""Ingest: sample batches from a user's companion to the engine over ``{prefix}/ingest/{user}``.

A batch carries ``stream_id`` (one per companion stream session) and ``seq`` (0, 1, 2, ...
within it). QoS 1 and the companion's durable buffer may deliver a batch more than once;
:class:`Deduplicator` makes the engine see each (stream_id, seq) exactly once, and
:class:`IngestReceiver` is the engine's subscriber that applies it.

The message itself (JSON or binary) and its checks are :mod:`stresswatch.wire.ingest`; the
receiver decodes each payload there, with the engine's clock, before anything else sees it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

from .alerts.topics import Topics
from .errors import TransportError, WireError
from .mqtt import connect
from .wire.ingest import MAX_BATCH_SAMPLES, IngestBatch, decode_ingest
from .wire.limits import TimeWindow
from .wire.rejections import Rejections

log = logging.getLogger(__name__)


@dataclass
class Deduplicator:
    """Exactly-once view of at-least-once batches, per (user, stream_id), in bounded memory.

    Remembers the highest ``seq`` below which every batch was seen, plus the few seen
    above it (out of order). A stream that restarts gets a new ``stream_id``.
    """

    max_pending: int = 10_000
    _floor: dict[tuple[str, str], int] = field(default_factory=dict)  # all seq < floor seen
    _above: dict[tuple[str, str], set[int]] = field(default_factory=dict)

    def seen(self, batch: IngestBatch) -> bool:
        """Whether this (user, stream_id, seq) was already passed (does not record it)."""
        key = (batch.user, batch.stream_id)
        return batch.seq < self._floor.get(key, 0) or batch.seq in self._above.get(key, ())

    def first_time(self, batch: IngestBatch) -> bool:
        """True exactly once per (user, stream_id, seq); records it."""
        key = (batch.user, batch.stream_id)
        floor = self._floor.get(key, 0)
        above = self._above.setdefault(key, set())
        if batch.seq < floor or batch.seq in above:
            return False
        above.add(batch.seq)
        while floor in above:
            above.remove(floor)
            floor += 1
        if len(above) > self.max_pending:  # a lost batch must not grow memory forever
            floor = min(above)
            while floor in above:
                above.remove(floor)
                floor += 1
        self._floor[key] = floor
        return True

    def to_state(self) -> list[list[object]]:
        """What it remembers, as JSON-ready rows ``[user, stream_id, floor, [seq above]]`` (a
        partition's snapshot in cluster mode carries it to the next owner)."""
        keys = self._floor.keys() | self._above.keys()
        return [[u, s, self._floor.get((u, s), 0), sorted(self._above.get((u, s), ()))] for u, s in sorted(keys)]

    @classmethod
    def from_state(cls, rows: list[list[object]]) -> Deduplicator:
        d = cls()
        for user, stream, floor, above in rows:
            key = (str(user), str(stream))
            d._floor[key] = int(floor)  # type: ignore[call-overload]
            if above:
                d._above[key] = {int(x) for x in above}  # type: ignore[union-attr]
        return d


@dataclass(frozen=True)
class Received:
    """A message as received with manual acknowledgement: its bytes, and the PUBACK to send
    once it is durable (``ack()``, safe from any thread)."""

    payload: bytes
    ack: Callable[[], object]


@dataclass(frozen=True)
class Rejection:
    """A payload the receiver refused: the topic it came on and why (no sample values)."""

    topic: str
    reason: str


class IngestReceiver:
    """The engine's side of ingest: subscribes ``{prefix}/ingest/+`` and hands each batch,
    exactly once per (user, stream_id, seq), to ``on_batch``.

    * A persistent MQTT session (MQTT 5 session expiry / 3.1.1 clean session off), so
      batches a companion publishes while the engine is away are queued by the broker.
    * The subscription is renewed on every (re)connect: paho reconnects on its own and
      a broker that lost its session state must not silently stop delivering.
    * A payload that does not pass :func:`~stresswatch.wire.ingest.decode_ingest` (with
      ``clock()`` as now and ``window``), or whose ``user`` differs from the topic's user (a
      companion may only speak for its own user), is counted in ``rejections`` (one
      rate-limited log line per reason), kept among the last :attr:`rejected` and passed to
      ``on_invalid``; it never reaches ``on_batch``.
    * A batch is recorded as seen only after ``on_batch`` returned, so a callback that
      raised can be delivered again by a redelivery; the exception is logged and counted.

    ``on_batch`` runs on paho's network thread, one message at a time.

    With ``manual_ack`` nothing is acknowledged on receipt: ``on_batch(batch, received)``
    must call ``received.ack()`` once the batch is durable, and a duplicate goes to
    ``on_duplicate(received)`` (acknowledge it once its original is durable). A payload that
    is rejected is acknowledged at once: nothing of it will ever be kept. ``seen``: batches
    already processed (replayed from the engine's log at a restart), dropped if redelivered.
    """

    def __init__(
        self,
        url: str,
        on_batch: Callable[..., None],
        *,
        topics: Topics = Topics(),
        username: str | None = None,
        password: str | None = None,
        protocol: str = "auto",
        client_id: str = "stresswatch-engine-ingest",
        on_invalid: Callable[[Rejection], None] | None = None,
        timeout_s: float = 10.0,
        reconnect_max_s: int = 10,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        window: TimeWindow = TimeWindow(),
        rejections: Rejections | None = None,
        manual_ack: bool = False,
        on_duplicate: Callable[[Received], None] | None = None,
        seen: Iterable[IngestBatch] = (),
    ) -> None:
        self.url = url
        self.topics = topics
        self.subscription = f"{topics.prefix}/ingest/+"
        self._topic_head = f"{topics.prefix}/ingest/"
        self._on_batch = on_batch
        self._on_invalid = on_invalid
        self._dedup = Deduplicator()
        for batch in seen:
            self._dedup.first_time(batch)
        self._manual_ack = manual_ack
        self._on_duplicate = on_duplicate
        self._lock = threading.Lock()
        self.accepted = 0
        self.duplicates = 0
        self._clock = clock
        self._window = window
        self.rejections = rejections if rejections is not None else Rejections(log)
        self.rejected: deque[Rejection] = deque(maxlen=100)  # the latest only: a flood must not grow memory
        self.failed = 0
        self._subscribed = threading.Event()
        self._client = connect(
            url,
            client_id,
            username=username,
            password=password,
            protocol=protocol,
            persistent_session=True,
            on_message=self._message,
            on_reconnect=self._on_reconnect,
            timeout_s=timeout_s,
            manual_ack=manual_ack,
            reconnect_max_s=reconnect_max_s,  # paho's default grows to 120 s
        )
        self._client.on_subscribe = self._on_subscribe
        self._client.subscribe(self.subscription, qos=1)
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise TransportError(f"no SUBACK for {self.subscription!r}", url=url)

    @property
    def connected(self) -> bool:
        """The MQTT link is up (the engine's health endpoint reads it)."""
        return self._client.is_connected()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reason_codes: object, props: object = None) -> None:
        self._subscribed.set()

    def _on_reconnect(self, client: mqtt.Client, session_present: bool) -> None:
        client.subscribe(self.subscription, qos=1)

    def _reject(self, topic: str, topic_user: str, error: WireError) -> None:
        reason = f"malformed payload: {error.field or ''} {error.message}".strip() if error.reason != "wrong_user" else error.message
        rejection = Rejection(topic, reason)
        with self._lock:
            self.rejected.append(rejection)
        self.rejections.record("ingest", error, user=topic_user)  # names a field and rule, never a value
        if self._on_invalid:
            self._on_invalid(rejection)

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        topic_user = topic[len(self._topic_head):] if topic.startswith(self._topic_head) else ""
        received = Received(msg.payload, functools.partial(client.ack, msg.mid, msg.qos)) if self._manual_ack else None
        try:
            batch = decode_ingest(msg.payload, topic=topic, now=self._clock(), window=self._window)
        except WireError as exc:
            self._reject(topic, topic_user, exc)
            if received is not None:
                received.ack()
            return
        if batch.user != topic_user:
            self._reject(topic, topic_user, WireError("payload user differs from the topic's user", reason="wrong_user", source=topic, field="user"))
            if received is not None:
                received.ack()
            return
        with self._lock:
            if self._dedup.seen(batch):
                self.duplicates += 1
                if received is not None and self._on_duplicate is not None:
                    self._on_duplicate(received)
                elif received is not None:
                    received.ack()
                return
        try:
            if received is not None:
                self._on_batch(batch, received)
            else:
                self._on_batch(batch)
        except Exception:  # noqa: BLE001 - the engine must keep receiving; the batch stays unseen
            with self._lock:
                self.failed += 1
            log.exception("ingest: on_batch failed for stream %s seq %d", batch.stream_id, batch.seq)
            return
        with self._lock:
            self._dedup.first_time(batch)
            self.accepted += 1

    def close(self) -> None:
        """Disconnect (the broker keeps the session and queues batches until the next start)."""
        self._client.on_connect = None
        self._client.disconnect()
        self._client.loop_stop()


__all__ = ["MAX_BATCH_SAMPLES", "Deduplicator", "IngestBatch", "IngestReceiver", "Received", "Rejection"]
