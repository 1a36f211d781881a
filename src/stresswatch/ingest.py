"""Ingest: sample batches from a user's companion to the engine over ``{prefix}/ingest/{user}``.

A batch carries ``stream_id`` (one per companion stream session) and ``seq`` (0, 1, 2, ...
within it). QoS 1 and the companion's durable buffer may deliver a batch more than once;
:class:`Deduplicator` makes the engine see each (stream_id, seq) exactly once, and
:class:`IngestReceiver` is the engine's subscriber that applies it.

Wire format (``schema_version`` 1): a JSON object (pydantic :class:`IngestBatch`), columnar::

    {"schema_version": 1, "user": "alice", "stream_id": "…", "seq": 7, "source": "ble_hrs/…",
     "time_ns": [...], "metric": ["rr_ms", ...], "value": [...]}

The same batch may also arrive in the compact binary format of :mod:`stresswatch.wire`
(first bytes ``FF 53 57``); :meth:`IngestBatch.decode` accepts both (docs/INGEST.md).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .alerts.topics import Topics
from .alerts.transport import connect
from .errors import ParseError, TransportError
from .model import SAMPLES_SCHEMA, Metric, decode_json
from . import wire

log = logging.getLogger(__name__)

MAX_BATCH_SAMPLES = 100_000
_METRICS = tuple(Metric(m) for m in wire.METRICS)


class IngestBatch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(default=1, ge=1, le=1)
    user: str = Field(min_length=1)
    stream_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)
    source: str
    time_ns: list[int] = Field(max_length=MAX_BATCH_SAMPLES)
    metric: list[Metric] = Field(max_length=MAX_BATCH_SAMPLES)
    value: list[float] = Field(max_length=MAX_BATCH_SAMPLES)

    @model_validator(mode="after")
    def _same_length(self) -> IngestBatch:
        if not len(self.time_ns) == len(self.metric) == len(self.value):
            raise ValueError("time_ns, metric and value must have the same length")
        return self

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, *, user: str, stream_id: str, seq: int, source: str) -> IngestBatch:
        return cls(
            user=user,
            stream_id=stream_id,
            seq=seq,
            source=source,
            time_ns=frame.get_column("time").dt.epoch("ns").to_list(),
            metric=frame.get_column("metric").to_list(),
            value=frame.get_column("value").to_list(),
        )

    def to_frame(self) -> pl.DataFrame:
        n = len(self.time_ns)
        return pl.DataFrame(
            {
                "user": [self.user] * n,
                "time": pl.Series(self.time_ns, dtype=pl.Int64).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
                "metric": [m.value for m in self.metric],
                "value": pl.Series(self.value, dtype=pl.Float64),
                "source": [self.source] * n,
            },
            schema=SAMPLES_SCHEMA,
        )

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    def encode_binary(self) -> bytes:
        """The same batch in the compact binary format (:mod:`stresswatch.wire`)."""
        return wire.encode(
            user=self.user,
            stream_id=self.stream_id,
            seq=self.seq,
            source=self.source,
            time_ns=self.time_ns,
            metric_code=[wire.METRIC_CODE[m.value] for m in self.metric],
            value=self.value,
        )

    @classmethod
    def from_wire(cls, b: wire.WireBatch) -> IngestBatch:
        """From a decoded binary batch (already checked against this model's constraints)."""
        metrics = [_METRICS[c] for c in b.metric_code]
        return cls.model_construct(
            schema_version=1, user=b.user, stream_id=b.stream_id, seq=b.seq, source=b.source,
            time_ns=b.time_ns, metric=metrics, value=b.value,
        )  # fmt: skip

    @classmethod
    def decode(cls, payload: bytes, *, topic: str = "ingest") -> IngestBatch:
        """Parse a payload, JSON or binary (:mod:`stresswatch.wire`, told apart by its first
        byte); anything malformed raises :class:`ParseError` naming the field."""
        if wire.is_binary(payload):
            return cls.from_wire(wire.decode(payload, source=topic))
        return decode_json(cls, payload, source=topic)


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
    * A payload that does not decode, or whose ``user`` differs from the topic's user (a
      companion may only speak for its own user), is counted in :attr:`rejected` and passed
      to ``on_invalid``; it never reaches ``on_batch``.
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
        self.rejected: list[Rejection] = []
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
            timeout_s=timeout_s,
            manual_ack=manual_ack,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)  # paho's default grows to 120 s
        self._client.on_subscribe = self._on_subscribe
        self._client.on_connect = self._on_reconnect
        self._client.subscribe(self.subscription, qos=1)
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise TransportError(f"no SUBACK for {self.subscription!r}", url=url)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reason_codes: object, props: object = None) -> None:
        self._subscribed.set()

    def _on_reconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        if not getattr(rc, "is_failure", False):
            client.subscribe(self.subscription, qos=1)

    def _reject(self, topic: str, reason: str) -> None:
        rejection = Rejection(topic, reason)
        with self._lock:
            self.rejected.append(rejection)
        log.warning("ingest: rejected a batch: %s", reason)  # reason names a field, never a value
        if self._on_invalid:
            self._on_invalid(rejection)

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        topic_user = topic[len(self._topic_head):] if topic.startswith(self._topic_head) else ""
        received = Received(msg.payload, functools.partial(client.ack, msg.mid, msg.qos)) if self._manual_ack else None
        try:
            batch = IngestBatch.decode(msg.payload, topic=topic)
        except ParseError as exc:
            self._reject(topic, f"malformed payload: {exc.field or ''} {exc.message}".strip())
            if received is not None:
                received.ack()
            return
        if batch.user != topic_user:
            self._reject(topic, "payload user differs from the topic's user")
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
