"""``stresswatch engine``: the long-running service's loop and lifecycle.

ingest (:class:`IngestReceiver`) -> consent check -> :class:`IngestBuffer` -> the one
:class:`Pipeline` (detector -> :class:`Dispatcher`: outbox, consent gate at send time,
MQTT). All state changes happen on the thread that calls :meth:`Engine.run`: paho
callbacks and the apscheduler jobs only enqueue work, so SQLite connections and the detector
are used from one thread and a consent change is always recorded before the next publish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..alerts import checkin, replies
from ..alerts.dispatch import Dispatcher
from ..alerts.outbox import Outbox
from ..alerts.topics import Topics
from ..alerts.transport import MqttTransport
from ..broker import check_broker_security, private_client_id
from ..clock import Clock, utc_now
from ..config import Settings
from ..consent.ledger import ConsentLedger
from ..detect import Detector
from ..errors import ParseError, StresswatchError, WireError
from ..ingest import IngestBatch, IngestReceiver
from ..pipeline import Pipeline
from ..private_files import DIR_MODE, private_dir, tighten
from ..store import SampleStore
from ..wire.acks import AckMessage
from ..wire.consent import decode_consent
from ..wire.ids import is_valid_id
from ..wire.rejections import Rejections
from .consent_cache import ConsentCache
from .erasure import erase_user
from .ingest_buffer import IngestBuffer, frame_of
from .persist import StatePersister
from .status import StatusPublisher

log = logging.getLogger("stresswatch.engine")

ENGINE_ONLINE = b'{"schema_version":1,"status":"online"}'
ENGINE_OFFLINE = b'{"schema_version":1,"status":"offline"}'

# A message on ``{prefix}/{kind}/{id}``: called on the engine thread with (id, payload, topic).
Handler = Callable[[str, bytes, str], None]


@dataclass(frozen=True)
class EngineStats:
    """Counters for operators and the load harness (read from any thread; approximate)."""

    batches_processed: int  # given to the detector, or dropped for lack of consent
    samples_processed: int
    dropped_batches: int  # from users whose consent does not allow processing
    queue: int  # jobs waiting on the engine thread
    users: int  # in the detector
    accepted: int | None  # by the ingest receiver (None before start)
    duplicates: int | None
    rejected: int  # every message refused at the wire boundary (by kind and reason: Engine.rejections.counts())


class Engine:
    """ingest -> detector -> durable outbox -> consent gate -> MQTT (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str,
        protocol: str | None = None,
        clock: Clock = utc_now,
        state_dir: Path | None = None,
        broker_conf: Path | None = None,
        flush_s: float = 0.5,
    ) -> None:
        """``broker_conf``: the broker's mosquitto.conf, if the operator has it, for the
        security check (no anonymous listener off loopback). ``flush_s``: at most this long
        in the ingest buffer, part of the alert latency budget (1 s); measured at 100,000
        users (benchmarks/load): 0.25 s kept the engine at a full core, 0.5 s at 0.75."""
        self.settings = settings
        self.broker_conf = broker_conf
        self.url = url
        self.protocol = protocol or settings.mqtt.protocol
        self.clock = clock
        self.flush_s = flush_s
        self.topics = Topics(settings.mqtt.prefix)
        self.state_dir = Path(state_dir or settings.store.state_dir)
        self.db_path = self.state_dir / "stresswatch.sqlite"
        self.store = SampleStore(self.state_dir) if settings.engine.keep_samples else None
        self.buffer = IngestBuffer()
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._flushed_at = 0.0
        self._handlers: dict[str, Handler] = {"consent": self._on_consent, "acks": self._on_ack, "checkin": self._on_checkin}
        self.batches_processed = 0
        self.samples_processed = 0
        self.dropped_batches = 0
        # every message refused at the wire boundary, by (kind, reason); one log line per reason a minute
        self.rejections = Rejections(log)
        self.transport: MqttTransport | None = None
        self.receiver: IngestReceiver | None = None
        self.dispatcher: Dispatcher | None = None
        self._scheduler: object | None = None
        self.ready = threading.Event()

    # -- public seams ------------------------------------------------------------------
    def add_handler(self, kind: str, handler: Handler) -> None:
        """Handle messages on ``{prefix}/{kind}/+`` (on the engine thread). Before :meth:`start`."""
        if self.dispatcher is not None:
            raise RuntimeError("add handlers before the engine starts")
        self._handlers[kind] = handler

    def call_soon(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the engine thread, after what is already queued (any thread)."""
        self._queue.put(job)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stats(self) -> EngineStats:
        rx = self.receiver
        pipeline = getattr(self, "pipeline", None)
        return EngineStats(
            self.batches_processed,
            self.samples_processed,
            self.dropped_batches,
            self._queue.qsize(),
            len(pipeline.detector.users) if pipeline is not None else 0,
            rx.accepted if rx else None,
            rx.duplicates if rx else None,
            self.rejections.total,
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Engine:
        """Open the stores, restore the detector, connect and subscribe. Call :meth:`run` from
        the same thread: the SQLite connections belong to it."""
        private_dir(self.state_dir)
        tighten(self.state_dir, DIR_MODE)  # heart data and consent histories: this account only
        self.ledger = ConsentLedger(self.db_path)
        self.outbox = Outbox(self.db_path)
        self.consent = ConsentCache(self.ledger)
        self.persister = StatePersister(self.db_path, self.outbox, self.store)
        blob = self.outbox.load_detector()
        detector = Detector.from_bytes(blob, self.settings.detector) if blob else Detector(self.settings.detector)
        m = self.settings.mqtt
        # Refuse an open broker off loopback before connecting (pure check, broker.py).
        check_broker_security(self.url, m.username, conf=self.broker_conf)
        self.transport = MqttTransport(
            self.url,
            # persistent session: a client id only the holder of the password can present
            client_id=private_client_id(m.client_id, m.password),
            username=m.username,
            password=m.password,
            protocol=self.protocol,
            will=(self.topics.engine_status, ENGINE_OFFLINE),
            persistent_session=True,
            on_message=self._on_message,
            on_reconnect=lambda: self._queue.put(self._announce),
            on_connection_lost=lambda: self._queue.put(self._connection_lost),
        )
        self.dispatcher = Dispatcher.from_settings(self.settings, self.outbox, self.ledger, self.transport, clock=self.clock)
        self.pipeline = Pipeline(detector, self.dispatcher)
        transport = self.transport
        self.status = StatusPublisher(
            self.topics,
            self.consent,
            lambda user: self.pipeline.detector.baseline_ready(user),
            lambda topic, body: transport.publish(topic, body, qos=1, retain=True),
        )
        self.transport.subscribe([f"{self.topics.prefix}/{kind}/+" for kind in self._handlers])
        self.receiver = IngestReceiver(
            self.url,
            lambda batch: self._queue.put(_BatchJob(self, batch)),
            topics=self.topics,
            username=m.username,
            password=m.password,
            protocol=self.protocol,
            client_id=private_client_id(f"{m.client_id}-ingest", m.password),
            clock=self.clock,
            window=self.settings.engine.time_window(),
            rejections=self.rejections,
        )
        from apscheduler.schedulers.background import BackgroundScheduler

        e = self.settings.engine
        sched = BackgroundScheduler(timezone="UTC")
        sched.add_job(lambda: self._queue.put(self.tick), "interval", seconds=e.tick_s, id="tick", max_instances=1, coalesce=True)
        sched.add_job(lambda: self._queue.put(self.persist), "interval", seconds=e.persist_s, id="persist", max_instances=1, coalesce=True)
        sched.start()
        self._scheduler = sched
        self._queue.put(self._announce)
        self._queue.put(self.dispatcher.pump)  # undelivered alerts from before a restart, same ids
        return self

    def request_stop(self) -> None:
        """Safe from a signal handler or another thread."""
        self._stopping.set()
        self._queue.put(None)

    def run(self) -> None:
        """Process work until :meth:`request_stop`; then shut down gracefully (starts first if
        :meth:`start` was not called)."""
        if self.dispatcher is None:
            self.start()
        assert self.dispatcher is not None
        self.ready.set()
        try:
            while not self._stopping.is_set():
                try:
                    job = self._queue.get(timeout=0.1)
                except queue.Empty:
                    job = None
                if job is not None:
                    self._run_job(job)
                    self._run_queued(until_stopped=True)  # drain what is queued, then publish once
                if len(self.buffer) and time.monotonic() - self._flushed_at >= self.flush_s:
                    self.flush()
                self.dispatcher.pump()
        finally:
            self.shutdown()

    def _run_queued(self, *, until_stopped: bool) -> None:
        """Run every job queued now (stop early at a stop request if ``until_stopped``)."""
        while not (until_stopped and self._stopping.is_set()):
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._run_job(job)

    def _run_job(self, job: Callable[[], None]) -> None:
        try:
            if len(self.buffer) and not isinstance(job, _BatchJob):
                self.flush()  # every other job sees the batches received before it
            job()
        except StresswatchError as exc:
            log.warning("%s", exc)

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)  # type: ignore[attr-defined]
            self._scheduler = None
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        self._run_queued(until_stopped=False)  # batches already received are processed, not lost
        self.flush()
        self.persist(wait=True)
        if self.dispatcher is not None and self.transport is not None:
            self.dispatcher.pump()
            self.dispatcher.drain(5.0)
            self.transport.publish(self.topics.engine_status, ENGINE_OFFLINE, qos=1, retain=True)
            try:
                self.transport.close()
            except StresswatchError as exc:
                log.warning("closing: %s", exc)
            self.transport = None
        self.rejections.flush()
        self.outbox.close()
        self.ledger.close()

    # -- jobs (engine thread) ------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        self.pipeline.advance(now, self.settings.engine.grace_s)
        self.pipeline.tick()
        self.status.sweep(now)

    def persist(self, *, wait: bool = False) -> None:
        """Save detector state and buffered samples (see :mod:`.persist`)."""
        now = self.clock()
        # Consent can also end without a message to this engine (expiry; a revocation written
        # into a ledger file it shares): forget those users before saving. From the consent
        # cache, which the status sweep refreshes from the ledger: a ledger read per user here
        # stalled the engine ~8 s per save at 100,000 users (docs/SCALING.md).
        for user in [u for u in self.pipeline.detector.users if not self.consent.may_process(u, now)]:
            self._forget(user)
        self.persister.save(self.pipeline.detector.to_bytes(), now, wait=wait)

    def flush(self) -> None:
        """Give every pending batch to the detector, as one frame."""
        if not len(self.buffer):
            return
        batches = self.buffer.take()
        self._flushed_at = time.monotonic()
        frame = frame_of(batches)
        self.pipeline.process(frame)
        self.persister.add_samples(frame)
        self.batches_processed += len(batches)
        self.samples_processed += frame.height
        self.status.after_flush(list(dict.fromkeys(b.user for b in batches)), self.clock())

    def _on_batch(self, batch: IngestBatch) -> None:
        if not self.consent.may_process(batch.user, self.clock()):  # SPEC: consent gates the whole engine
            self.dropped_batches += 1
            self.batches_processed += 1
            return
        self.buffer.add(batch)
        if self.buffer.full:
            self.flush()

    def _connection_lost(self) -> None:
        if self.dispatcher is not None:
            n = self.dispatcher.connection_lost()
            log.warning("broker connection lost: %d recently acknowledged alert(s) will be published again", n)

    def _announce(self) -> None:
        assert self.transport is not None
        self.transport.publish(self.topics.engine_status, ENGINE_ONLINE, qos=1, retain=True)
        self.status.announce(self.ledger.users(), self.clock())  # the reads also warm the consent cache

    def _on_message(self, topic: str, payload: bytes) -> None:
        """paho's thread: only enqueue, to the handler for the topic's kind. A topic whose last
        level is not a valid id (the broker's ACL should already refuse it) is counted, not handled."""
        head, _, who = topic.rpartition("/")
        prefix, _, kind = head.rpartition("/")
        handler = self._handlers.get(kind) if prefix == self.topics.prefix else None
        if handler is None:
            return
        if not is_valid_id(who):
            self.rejections.record(kind, "bad_id", field_name="topic")
            return
        self._queue.put(lambda: handler(who, payload, topic))

    def _on_consent(self, user: str, payload: bytes, topic: str) -> None:
        if not payload:  # an empty retained message: the user erased their data
            self.erase_user(user)
            return
        try:
            events = decode_consent(payload, topic_user=user, topic=topic, now=self.clock(), window=self.settings.engine.time_window())
        except WireError as exc:
            self.rejections.record("consent", exc, user=user)
            return
        self.consent.drop(user)
        if self.ledger.extend(events):
            now = self.clock()
            if not self.consent.may_process(user, now):
                self._forget(user)
            self.status.update(user, now)

    def _on_ack(self, worker: str, payload: bytes, topic: str) -> None:
        """An ack, resolve or list request: act, then tell the worker what was recorded. What is
        not recorded is counted (one log line per reason a minute), not logged per message."""
        assert self.dispatcher is not None and self.transport is not None
        reply = replies.answer(self.dispatcher, worker, payload, topic=topic)
        if not reply.ok:
            try:
                AckMessage.decode(payload, topic=topic)
            except WireError as exc:
                self.rejections.record("ack", exc, user=worker)
            else:  # a valid message that does not apply (unknown alert, not theirs, wrong state)
                self.rejections.record("ack", "not_applicable", user=worker, field_name="alert_id")
        self.transport.publish(self.topics.replies(worker), reply.encode(), qos=1, expiry_s=replies.REPLY_EXPIRY_S)

    def _on_checkin(self, user: str, payload: bytes, topic: str) -> None:
        """The person asked for contact: the same dispatcher (and consent gate) as a detector alert."""
        assert self.dispatcher is not None
        try:
            decision = checkin.decision_for(user, payload, now=self.clock(), topic=topic)
        except ParseError as exc:
            self.rejections.record("checkin", exc, user=user)
            return
        self.dispatcher.raise_alerts([decision])

    def _forget(self, user: str) -> None:
        self.buffer.drop_user(user)
        self.pipeline.forget(user)
        self.persister.drop_user(user)

    def erase_user(self, user: str) -> dict[str, int]:
        """Remove the user from every store this engine keeps, and clear their status topic."""
        self._forget(user)
        self.consent.drop(user)
        removed = erase_user(
            user,
            self.pipeline.detector,
            persister=self.persister,
            ledger=self.ledger,
            outbox=self.outbox,
            store=self.store,
            detector_settings=self.settings.detector,
            now=self.clock(),
        )
        self.status.clear(user)
        return removed

    def user_status(self, user: str, now: datetime) -> str:
        return self.status.status_of(user, now)


class _BatchJob:
    """A received batch on the engine's work queue (told apart from other jobs by its type)."""

    __slots__ = ("engine", "batch")

    def __init__(self, engine: Engine, batch: IngestBatch) -> None:
        self.engine = engine
        self.batch = batch

    def __call__(self) -> None:
        self.engine._on_batch(self.batch)


__all__ = ["ENGINE_OFFLINE", "ENGINE_ONLINE", "Engine", "EngineStats", "Handler"]
