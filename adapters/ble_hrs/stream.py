"""``stresswatch stream``: live samples to the engine as :class:`~stresswatch.ingest.IngestBatch`
on ``{prefix}/ingest/{user}``, through the durable :class:`~.buffer.StreamBuffer`.

Exactly once, end to end:

1. Each batch gets ``(stream_id, seq)`` and is committed to SQLite before anything is sent.
2. :class:`DurablePublisher` hands at most ``window`` buffered batches to paho at a time
   (QoS 1). paho keeps unacknowledged messages across reconnects and re-sends them itself.
   With ``confirm`` (what ``stresswatch stream`` uses) a row is deleted only when the engine
   confirms the batch is in its ingest log (its digest on ``{prefix}/ingested/{user}``): the
   broker's PUBACK is not enough, because the ingest broker saves its store only every minute
   (docs/BROKER.md, "Two brokers"). A row the broker acknowledged is sent again after every
   reconnect (the broker may have crashed with it), when the engine says "online" on
   ``{prefix}/engine/status`` of that broker (it has subscribed again: before that, a
   restarted broker drops what it acknowledges) and after ``confirm_timeout_s`` without a
   confirmation. Without ``confirm`` the row is deleted on the broker's PUBACK.
3. After a crash, every row still buffered is sent again with its original id; the engine's
   deduplicator drops copies it already has, and confirms them again.

The broker may be down when streaming starts: the client (from :mod:`stresswatch.mqtt`, the
one factory: ``"auto"`` protocol, TLS with the URL's ``cafile``, credentials) keeps trying
while samples accumulate on disk; after the first connection paho reconnects by itself. A
broker that refuses the account stops the attempts (:attr:`DurablePublisher.error`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from stresswatch.alerts.topics import Topics
from stresswatch.errors import TransportError, WireError
from stresswatch.ingest import MAX_BATCH_SAMPLES, IngestBatch, confirmation_of, read_confirmations
from stresswatch.mqtt import BackgroundConnection, BrokerAddress
from stresswatch.wire.ingest import representable

from .buffer import StreamBuffer
from .session import Gap, LinkLost, Reading, Rejected, SampleAssembler, SessionItem

log = logging.getLogger(__name__)


def confirmation_topics(ingest_topic: str) -> tuple[str, str]:
    """``{prefix}/ingest/{user}`` -> (``{prefix}/ingested/{user}``, where the engine confirms;
    ``{prefix}/engine/status``, where it says it is subscribed again)."""
    head, _, user = ingest_topic.rpartition("/")
    base, _, kind = head.rpartition("/")
    if kind != "ingest":
        raise ValueError(f"not an ingest topic: {ingest_topic!r}")
    return f"{base}/ingested/{user}", f"{base}/engine/status"


def _says_online(payload: bytes) -> bool:
    try:
        return json.loads(payload).get("status") == "online"
    except (ValueError, AttributeError):
        return False


class DurablePublisher:
    """Sends buffered batches over MQTT and deletes each once it is safe: on the engine's
    confirmation (``confirm``) or on the broker's PUBACK."""

    def __init__(
        self,
        url: str,
        buffer: StreamBuffer,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        protocol: str = "auto",
        window: int = 200,
        reconnect_max_s: float = 5.0,
        confirm: bool = False,
        confirm_timeout_s: float = 300.0,
    ) -> None:
        self.buffer = buffer
        self.window = window
        self.confirm = confirm
        self.confirm_timeout_s = confirm_timeout_s
        self._by_digest: dict[bytes, tuple[str, int]] = {}  # handed rows' confirmations
        self._brokered: dict[tuple[str, int], float] = {}  # PUBACKed, not yet confirmed: since when
        self._confirm_topics: set[str] = set()  # subscribed on this connection
        self.resent = 0
        self.url = str(BrokerAddress.parse(url))
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[str, int]] = {}  # mid -> key
        self._handed: set[tuple[str, int]] = set()
        self._early: set[int] = set()
        self._client: mqtt.Client | None = None
        self.refused = 0
        self.connected = threading.Event()
        self.acked = 0
        self.connects = 0
        # The broker may be away when streaming starts: connect in the background while
        # batches accumulate in the buffer (nothing is handed to paho before the first CONNACK).
        self._connection = BackgroundConnection(
            url,
            client_id or f"stresswatch-companion-{uuid.uuid4().hex[:12]}",
            self._on_first_connect,
            username=username,
            password=password,
            protocol=protocol,
            keepalive_s=15,
            retry_max_s=reconnect_max_s,
            on_reconnect=self._on_reconnect,
            on_refused=self._on_refused,
        )

    @property
    def error(self) -> TransportError | None:
        """Set when the broker refused the account: retrying cannot help."""
        return self._connection.error

    def _on_first_connect(self, client: mqtt.Client) -> None:
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_confirmation
        with self._lock:
            self._client = client
        self._on_reconnect(client, False)

    def _on_reconnect(self, client: mqtt.Client, session_present: bool) -> None:
        self.connects += 1
        with self._lock:
            topics = sorted(self._confirm_topics)
            if self.connects > 1:
                self._send_again()  # the broker may have crashed with what it acknowledged
        for topic in topics:
            client.subscribe(topic, qos=0)
        self.connected.set()

    def _send_again(self) -> None:
        """Hand over again what the broker acknowledged and the engine has not confirmed (the
        engine drops the copies it has and confirms them once more). Holding ``_lock``."""
        for key in self._brokered:
            self._handed.discard(key)
        self.resent += len(self._brokered)
        self._brokered.clear()

    def _on_confirmation(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/engine/status"):
            # The engine is subscribed again (a restart of it or of the broker): what the broker
            # acknowledged meanwhile may have been dropped for want of a subscriber.
            if _says_online(msg.payload):
                with self._lock:
                    self._send_again()
            return
        try:
            digests = read_confirmations(msg.payload, source=msg.topic)
        except WireError as exc:
            log.warning("stream: %s", exc)
            return
        done = []
        with self._lock:
            for d in digests:
                key = self._by_digest.pop(d, None)
                if key is not None:
                    self._brokered.pop(key, None)
                    done.append(key)
        for key in done:
            self._acked(key)

    def _on_refused(self, error: TransportError) -> None:
        log.warning("stream: %s", error)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, *args: object) -> None:
        self.connected.clear()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object = None, props: object = None) -> None:
        # Called by paho with its own message lock held: never block on anything that
        # publish() might hold (that is why pump() does not hold our lock while publishing).
        if getattr(reason, "is_failure", False):
            log.warning("stream: the broker refused a batch (%s); it stays buffered", reason)
            with self._lock:
                self._inflight.pop(mid, None)
                self.refused += 1
            return
        with self._lock:
            key = self._inflight.pop(mid, None)
            if key is None:
                self._early.add(mid)  # PUBACK before pump() recorded the mid
                return
            if self.confirm:  # the broker has it; the engine's confirmation deletes it
                if key in self._handed:
                    self._brokered[key] = time.monotonic()
                return
        self._acked(key)

    def _acked(self, key: tuple[str, int]) -> None:
        self.buffer.remove(*key)  # only now: the broker has it
        with self._lock:
            self._handed.discard(key)
            self.acked += 1

    def pump(self) -> int:
        """Hand buffered rows to paho up to the window; returns how many were handed over.
        Rows the broker acknowledged but the engine has not confirmed for
        ``confirm_timeout_s`` are handed over again."""
        with self._lock:
            if self._brokered:
                stale = time.monotonic() - self.confirm_timeout_s
                for key in [k for k, t in self._brokered.items() if t < stale]:
                    del self._brokered[key]
                    self._handed.discard(key)
                    self.resent += 1
            room = self.window - len(self._handed)
            exclude = set(self._handed)
        if room <= 0:
            return 0
        with self._lock:
            client = self._client
        if client is None:
            return 0  # not connected yet: the rows wait in the buffer
        rows = self.buffer.pending(room, exclude=exclude)
        for row in rows:
            key = (row.stream_id, row.seq)
            subscribe = None
            with self._lock:
                self._handed.add(key)
                if self.confirm:
                    self._by_digest[confirmation_of(row.payload)] = key
                    subscribe = [t for t in confirmation_topics(row.topic) if t not in self._confirm_topics]
                    self._confirm_topics.update(subscribe)
            for topic in subscribe or ():  # before the publish: the confirmation may come at once
                client.subscribe(topic, qos=0)
            info = client.publish(row.topic, row.payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise TransportError(f"publish failed: {mqtt.error_string(info.rc)}", url=self.url)
            with self._lock:
                early = info.mid in self._early
                if early:
                    self._early.discard(info.mid)
                else:
                    self._inflight[info.mid] = key
            if early:
                self._acked(key)
        return len(rows)

    def drain(self, timeout_s: float, *, poll_s: float = 0.05) -> bool:
        """Keep pumping until the buffer is empty; False if ``timeout_s`` passed first.
        Raises :class:`~stresswatch.mqtt.NotAuthorised` when the broker refused the account."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.error is not None:
                raise self.error
            self.pump()
            if self.buffer.count() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def close(self) -> None:
        self._connection.close()


@dataclass
class StreamStats:
    batches: int = 0
    samples: int = 0
    notifications: int = 0
    rejected: int = 0
    gaps: list[Gap] = field(default_factory=list)


class IngestStreamer:
    """Groups session items into batches of ``batch_s`` seconds (arrival time) and buffers them."""

    def __init__(
        self,
        buffer: StreamBuffer,
        *,
        user: str,
        topics: Topics = Topics(),
        source: str = "ble_hrs",
        batch_s: float = 10.0,
        stream_id: str | None = None,
        on_buffered: Callable[[], None] | None = None,
    ) -> None:
        self.buffer = buffer
        self.user = user
        self.topic = topics.ingest(user)
        self.source = source
        self.batch_ns = int(batch_s * 1e9)
        self.stream_id = stream_id or uuid.uuid4().hex
        self.seq = 0
        self.stats = StreamStats()
        self._assembler = SampleAssembler(user=user, source=source)
        self._chunk_start: int | None = None
        self._on_buffered = on_buffered

    def add(self, item: SessionItem) -> None:
        if isinstance(item, Gap):
            self.stats.gaps.append(item)
            self.buffer.add_gap(item.start_ns, item.end_ns, item.reason)
            return
        if isinstance(item, LinkLost):
            self.flush()  # the samples before an outage must not wait in memory for the device to return
            return
        if isinstance(item, Rejected):
            self.stats.rejected += 1
            return
        assert isinstance(item, Reading)
        self.stats.notifications += 1
        if self._chunk_start is None:
            self._chunk_start = item.arrival_ns
        self._assembler.add(item)
        if item.arrival_ns - self._chunk_start >= self.batch_ns:
            self.flush(final=False)

    def flush(self, *, final: bool = True) -> None:
        """Buffer what is ready as batches (``final``: everything, at the end of the stream)."""
        frame = self._assembler.flush() if final else self._assembler.ready()
        kept = representable(frame)  # a strap's glitch (e.g. HR 0xFFFF) would get the whole batch refused
        self.stats.rejected += frame.height - kept.height
        frame = kept
        self._chunk_start = None
        for start in range(0, max(frame.height, 1), MAX_BATCH_SAMPLES):
            part = frame.slice(start, MAX_BATCH_SAMPLES)
            if part.height == 0:
                return  # only missing data in this chunk: nothing to send
            batch = IngestBatch.from_frame(part, user=self.user, stream_id=self.stream_id, seq=self.seq, source=self.source)
            self.buffer.add(self.stream_id, self.seq, self.topic, batch.encode(), part.height)
            self.seq += 1
            self.stats.batches += 1
            self.stats.samples += part.height
        if self._on_buffered:
            self._on_buffered()

    async def consume(self, items: AsyncIterator[SessionItem]) -> StreamStats:
        async for item in items:
            self.add(item)
        self.flush()
        return self.stats
