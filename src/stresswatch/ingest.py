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
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import paho.mqtt.client as mqtt

from .alerts.topics import Topics
from .errors import InvalidId, TransportError, WireError
from .mqtt import connect
from .mqtt_bulk import BulkSubscriber
from .mqtt_packets import Publish, publish as publish_packet
from .wire.ingest import MAX_BATCH_SAMPLES, IngestBatch, decode_ingest
from .wire.limits import TimeWindow
from .wire.rejections import Rejections

log = logging.getLogger(__name__)


_MAX_SEQ = 2**64 - 1


class Deduplicator:
    """Exactly-once view of at-least-once batches, per (user, stream_id), in bounded memory.

    Remembers the highest ``seq`` below which every batch was seen (the floor), plus the few
    seen above it (out of order). A stream that restarts gets a new ``stream_id``.

    Compact at 100,000 users: each user's latest stream and its floor sit in one slot (a
    list entry and a uint64); a user's other streams (an older stream's redeliveries, an
    import) and out-of-order seqs, both rare, go to small dictionaries. A dictionary keyed
    by (user, stream_id) with a set per key cost about 500 bytes a user.
    """

    def __init__(self, max_pending: int = 10_000) -> None:
        self.max_pending = max_pending
        self._slot: dict[str, int] = {}  # user -> slot
        self._stream: list[str] = []  # slot -> the user's latest stream_id
        self._floors = np.zeros(0, np.uint64)  # slot -> all seq < floor seen
        self._other: dict[tuple[str, str], int] = {}  # floors of a user's other streams
        self._above: dict[tuple[str, str], set[int]] = {}  # seen above the floor (out of order)

    def _floor(self, user: str, stream_id: str) -> int:
        i = self._slot.get(user)
        if i is not None and self._stream[i] == stream_id:
            return int(self._floors[i])
        return self._other.get((user, stream_id), 0)

    def _set_floor(self, user: str, stream_id: str, floor: int) -> None:
        if floor > _MAX_SEQ:  # past the last uint64 seq: kept aside, the slot freed ("" is no stream id)
            i = self._slot.get(user)
            if i is not None and self._stream[i] == stream_id:
                self._stream[i] = ""
            self._other[(user, stream_id)] = floor
            return
        i = self._slot.get(user)
        if i is None:
            i = self._slot[user] = len(self._stream)
            self._stream.append(stream_id)
            if i >= len(self._floors):
                self._floors = np.concatenate([self._floors, np.zeros(max(1024, len(self._floors)), np.uint64)])
        elif self._stream[i] != stream_id:  # the user's latest stream takes the slot
            if self._stream[i]:
                self._other[(user, self._stream[i])] = int(self._floors[i])
            self._other.pop((user, stream_id), None)
            self._stream[i] = stream_id
        self._floors[i] = floor

    def seen(self, batch: IngestBatch) -> bool:
        """Whether this (user, stream_id, seq) was already passed (does not record it)."""
        key = (batch.user, batch.stream_id)
        return batch.seq < self._floor(*key) or batch.seq in self._above.get(key, ())

    def first_time(self, batch: IngestBatch) -> bool:
        """True exactly once per (user, stream_id, seq); records it."""
        key = (batch.user, batch.stream_id)
        floor = self._floor(*key)
        above = self._above.get(key)
        if batch.seq < floor or (above is not None and batch.seq in above):
            return False
        if batch.seq == floor and not above:  # in order: the common case, no set
            self._set_floor(*key, floor + 1)
            return True
        above = self._above.setdefault(key, set())
        above.add(batch.seq)
        while floor in above:
            above.remove(floor)
            floor += 1
        if len(above) > self.max_pending:  # a lost batch must not grow memory forever
            floor = min(above)
            while floor in above:
                above.remove(floor)
                floor += 1
        if not above:
            del self._above[key]
        self._set_floor(*key, floor)
        return True

    def _keys(self) -> set[tuple[str, str]]:
        slots = {(u, self._stream[i]) for u, i in self._slot.items() if self._stream[i]}
        return slots | self._other.keys() | self._above.keys()

    def to_state(self) -> list[list[object]]:
        """What it remembers, as JSON-ready rows ``[user, stream_id, floor, [seq above]]`` (a
        partition's snapshot in cluster mode carries it to the next owner)."""
        return [[u, s, self._floor(u, s), sorted(self._above.get((u, s), ()))] for u, s in sorted(self._keys())]

    @classmethod
    def from_state(cls, rows: list[list[object]]) -> Deduplicator:
        d = cls()
        for user, stream, floor, above in rows:
            key = (str(user), str(stream))
            d._set_floor(*key, int(floor))  # type: ignore[call-overload]
            if above:
                d._above[key] = {int(x) for x in above}  # type: ignore[union-attr]
        return d


CONFIRMATION_BYTES = 16


def confirmation_of(payload: bytes) -> bytes:
    """What the engine publishes on ``{prefix}/ingested/{user}`` once it has settled a payload
    (in its ingest log, a duplicate of one there, or refused for good): the payload's
    16-byte BLAKE2b digest. The companion keeps each batch until this arrives."""
    return hashlib.blake2b(payload, digest_size=CONFIRMATION_BYTES).digest()


def read_confirmations(payload: bytes, *, source: str = "ingested") -> list[bytes]:
    """The digests in a confirmation message (one or more, 16 bytes each); anything else
    raises :class:`WireError`."""
    if not payload or len(payload) % CONFIRMATION_BYTES:
        raise WireError(f"a confirmation is a multiple of {CONFIRMATION_BYTES} bytes", reason="malformed", source=source)
    return [payload[i : i + CONFIRMATION_BYTES] for i in range(0, len(payload), CONFIRMATION_BYTES)]


@dataclass(frozen=True)
class Received:
    """A message as received with manual acknowledgement: its bytes, and the PUBACK (with the
    engine's confirmation to the companion) to send once it is durable (``ack()``, safe from
    any thread; :meth:`IngestReceiver.flush` sends what the acks of a group queued)."""

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
    * The subscription is renewed on every (re)connect: the client reconnects on its own and
      a broker that lost its session state must not silently stop delivering.
    * A payload that does not pass :func:`~stresswatch.wire.ingest.decode_ingest` (with
      ``clock()`` as now and ``window``), or whose ``user`` differs from the topic's user (a
      companion may only speak for its own user), is counted in ``rejections`` (one
      rate-limited log line per reason), kept among the last :attr:`rejected` and passed to
      ``on_invalid``; it never reaches ``on_batch``.
    * A batch is recorded as seen only after ``on_batch`` returned, so a callback that
      raised can be delivered again by a redelivery; the exception is logged and counted.

    ``reader``: ``"paho"`` (``on_batch`` runs on paho's network thread, one message at a
    time) or ``"bulk"`` (:class:`~stresswatch.mqtt_bulk.BulkSubscriber`: every message of one
    socket read, on its thread).

    With ``manual_ack`` nothing is acknowledged on receipt: ``on_batch(batch, received)``
    must call ``received.ack()`` once the batch is durable, and a duplicate goes to
    ``on_duplicate(received)`` (acknowledge it once its original is durable). A payload that
    is rejected is acknowledged at once: nothing of it will ever be kept. Each ``ack()`` also
    publishes the payload's :func:`confirmation_of` on ``{prefix}/ingested/{user}`` (QoS 0),
    which tells the companion it may forget the batch (without ``manual_ack``: once the
    message is handled). ``seen``: batches already processed
    (replayed from the engine's log at a restart), dropped if redelivered.
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
        reader: str = "paho",
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        if reader not in ("paho", "bulk"):
            raise TransportError(f"unknown ingest reader {reader!r}: paho or bulk")
        if reader == "bulk" and not manual_ack:
            raise TransportError("the bulk ingest reader acknowledges only by hand (manual_ack=True)")
        self.url = url
        self.topics = topics
        self.reader = reader
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
        self._bulk: BulkSubscriber | None = None
        self._client: mqtt.Client | None = None
        self._after_reconnect = on_reconnect
        if reader == "bulk":
            self._bulk = BulkSubscriber(
                url, client_id, self.subscription, self._publishes, username=username, password=password,
                protocol=protocol, timeout_s=timeout_s, reconnect_max_s=reconnect_max_s, on_reconnect=on_reconnect,
            )  # fmt: skip
            self._bulk.start()
            return
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
        if self._bulk is not None:
            return self._bulk.connected.is_set()
        assert self._client is not None
        return self._client.is_connected()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reason_codes: object, props: object = None) -> None:
        self._subscribed.set()

    def _on_reconnect(self, client: mqtt.Client, session_present: bool) -> None:
        client.subscribe(self.subscription, qos=1)
        if self._after_reconnect is not None:
            self._after_reconnect()

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained message on this connection (the engine's per-user status, which
        lives on the ingest broker). paho: QoS 1; bulk: QoS 0, dropped while disconnected
        (``on_reconnect`` is the caller's cue to publish its retained messages again)."""
        if self._bulk is not None:
            self._bulk.send(publish_packet(topic, payload, retain=True, version=self._bulk.version))
        else:
            assert self._client is not None
            self._client.publish(topic, payload, qos=1, retain=True)

    def _reject(self, topic: str, topic_user: str, error: WireError) -> None:
        reason = f"malformed payload: {error.field or ''} {error.message}".strip() if error.reason != "wrong_user" else error.message
        rejection = Rejection(topic, reason)
        with self._lock:
            self.rejected.append(rejection)
        self.rejections.record("ingest", error, user=topic_user)  # names a field and rule, never a value
        if self._on_invalid:
            self._on_invalid(rejection)

    def _confirm_topic(self, topic_user: str) -> str | None:
        try:
            return self.topics.ingested(topic_user)
        except InvalidId:
            return None  # not a user's topic: nobody to confirm to

    # -- the two readers ---------------------------------------------------------------
    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        """paho: one message."""
        received = None
        if self._manual_ack:
            confirm_topic = self._confirm_topic(msg.topic[len(self._topic_head) :])
            payload, mid, qos = msg.payload, msg.mid, msg.qos

            def ack() -> None:
                client.ack(mid, qos)
                if confirm_topic is not None:
                    client.publish(confirm_topic, confirmation_of(payload), qos=0)

            received = Received(payload, ack)
        settled = self._handle(msg.topic, msg.payload, received)
        if settled and received is None:  # acknowledged on receipt: confirm once handled
            confirm_topic = self._confirm_topic(msg.topic[len(self._topic_head) :])
            if confirm_topic is not None:
                client.publish(confirm_topic, confirmation_of(msg.payload), qos=0)

    def _publishes(self, publishes: list[Publish], generation: int) -> None:
        """bulk: the messages of one socket read."""
        bulk = self._bulk
        assert bulk is not None
        head = len(self._topic_head)
        for p in publishes:
            confirm_topic = self._confirm_topic(p.topic[head:])
            extra = publish_packet(confirm_topic, confirmation_of(p.payload), version=bulk.version) if confirm_topic is not None else b""
            if p.qos:
                received = Received(p.payload, functools.partial(bulk.ack, p.packet_id, generation, extra))
            else:
                received = Received(p.payload, lambda: None)
            self._handle(p.topic, p.payload, received)
        bulk.flush_acks()  # the acks of rejected messages go out now

    def flush(self) -> None:
        """Send the PUBACKs and confirmations that ``ack()`` calls queued (any thread)."""
        if self._bulk is not None:
            self._bulk.flush_acks()

    def _handle(self, topic: str, payload: bytes, received: Received | None) -> bool:
        """Decode, check, de-duplicate and pass on one message; False if ``on_batch`` raised
        (the message stays unseen)."""
        topic_user = topic[len(self._topic_head):] if topic.startswith(self._topic_head) else ""
        try:
            batch = decode_ingest(payload, topic=topic, now=self._clock(), window=self._window)
        except WireError as exc:
            self._reject(topic, topic_user, exc)
            if received is not None:
                received.ack()
            return True
        if batch.user != topic_user:
            self._reject(topic, topic_user, WireError("payload user differs from the topic's user", reason="wrong_user", source=topic, field="user"))
            if received is not None:
                received.ack()
            return True
        with self._lock:
            if self._dedup.seen(batch):
                self.duplicates += 1
                if received is not None and self._on_duplicate is not None:
                    self._on_duplicate(received)
                elif received is not None:
                    received.ack()
                return True
        try:
            if received is not None:
                self._on_batch(batch, received)
            else:
                self._on_batch(batch)
        except Exception:  # noqa: BLE001 - the engine must keep receiving; the batch stays unseen
            with self._lock:
                self.failed += 1
            log.exception("ingest: on_batch failed for stream %s seq %d", batch.stream_id, batch.seq)
            return False
        with self._lock:
            self._dedup.first_time(batch)
            self.accepted += 1
        return True

    def close(self) -> None:
        """Disconnect (the broker keeps the session and queues batches until the next start)."""
        if self._bulk is not None:
            self._bulk.close()
            return
        assert self._client is not None
        self._client.on_connect = None
        self._client.disconnect()
        self._client.loop_stop()


__all__ = [
    "CONFIRMATION_BYTES", "MAX_BATCH_SAMPLES", "Deduplicator", "IngestBatch", "IngestReceiver", "Received", "Rejection",
    "confirmation_of", "read_confirmations",
]  # fmt: skip
