"""``stresswatch engine``: the long-running service's loop and lifecycle.

ingest (:class:`Intake`: receiver, ingest log, PUBACK once durable) -> consent check ->
:class:`IngestBuffer` -> the one :class:`Pipeline` (detector -> :class:`Dispatcher`: outbox,
consent gate at send time, MQTT). All state changes happen on the thread that calls
:meth:`Engine.run`: paho callbacks, the ingest log and the apscheduler jobs only enqueue
work, so SQLite connections and the detector are used from one thread and a consent change
is always recorded before the next publish. No exception escapes a job: a fault in one
user's data quarantines that user (:mod:`.quarantine`), any other is logged (rate-limited).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from ..alerts.dispatch import DispatchStats, Dispatcher
from ..alerts.outbox import Outbox
from ..alerts.topics import Topics
from ..alerts.transport import MqttTransport
from ..broker import check_broker_security, private_client_id
from ..clock import Clock, utc_now
from ..config import Settings
from ..consent.ledger import ConsentLedger
from ..consent.state import ConsentState
from ..errors import StresswatchError
from ..ingest import IngestBatch
from ..pipeline import Pipeline
from ..private_files import DIR_MODE, private_dir, tighten
from ..store import SampleStore
from ..wire.rejections import Rejections
from .consent_cache import ConsentCache
from .erasure import erase_user
from .ingest_buffer import IngestBuffer, readable_frame
from . import handlers
from .intake import Intake
from .isolation import detect_isolated, dispatch_isolated
from .metrics import EngineMetrics, Health, MetricsServer, assess_health
from .persist import StatePersister
from .quarantine import Quarantine
from .routing import FaultLog, Handler, Router
from .status import StatusPublisher

log = logging.getLogger("stresswatch.engine")

ENGINE_ONLINE = b'{"schema_version":1,"status":"online"}'
ENGINE_OFFLINE = b'{"schema_version":1,"status":"offline"}'
ANNOUNCE_SLICE = 2_000  # users' consent loaded and statuses published per engine job at start (about 0.1-0.5 s)

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
    quarantined: int  # users set aside after a fault in their data path
    dropped_quarantined: int = 0  # batches of quarantined users, not processed
    buffered: int = 0  # batches waiting for the next flush
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)  # by (kind, reason)
    alerts: DispatchStats = field(default_factory=DispatchStats)  # a copy
    alerts_in_flight: int = 0
    broker_links: dict[str, bool | None] = field(default_factory=dict)  # link -> connected (None: unknown)


class Engine:
    """ingest -> detector -> durable outbox -> consent gate -> MQTT (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str,
        ingest_url: str | None = None,
        protocol: str | None = None,
        clock: Clock = utc_now,
        state_dir: Path | None = None,
        broker_conf: Path | None = None,
        flush_s: float = 0.5,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        """``broker_conf``: the broker's mosquitto.conf, if the operator has it, for the
        security check (no anonymous listener off loopback). ``flush_s``: at most this long
        in the ingest buffer, part of the alert latency budget (1 s); measured at 100,000
        users (benchmarks/load): 0.25 s kept the engine at a full core, 0.5 s at 0.75.
        ``metrics_registry``: where the operator metrics go (a new registry by default);
        served on ``settings.metrics`` while the engine runs (:mod:`.metrics`)."""
        self.settings = settings
        self.broker_conf = broker_conf
        self.url = url
        # the ingest broker (docs/BROKER.md, "Two brokers"); without one, ``url`` carries ingest too
        self.ingest_url = ingest_url or settings.mqtt.ingest_url or url
        self.protocol = protocol or settings.mqtt.protocol
        self.clock = clock
        self.flush_s = flush_s
        self.topics = Topics(settings.mqtt.prefix)
        self.state_dir = Path(state_dir or settings.store.state_dir)
        self.db_path = self.state_dir / "stresswatch.sqlite"
        self.store = SampleStore(self.state_dir) if settings.engine.keep_samples else None
        self.buffer = IngestBuffer()
        self.quarantine = Quarantine()
        self.faults = FaultLog()
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._flushed_at = 0.0
        self.router = Router(self.topics.prefix, self._message_fault, on_bad_id=lambda kind: self.rejections.record(kind, "bad_id", field_name="topic"))
        for kind, handler in (("consent", handlers.on_consent), ("acks", handlers.on_ack), ("checkin", handlers.on_checkin)):
            self.router.handlers[kind] = partial(handler, self)
        self.applied_seq = 0  # the last ingest-log record handed to the detector (or dropped)
        self._truncate_seq = 0  # the previous snapshot's: the log keeps one interval more (see persist)
        self.batches_processed = 0
        self.samples_processed = 0
        self.dropped_batches = 0
        # every message refused at the wire boundary, by (kind, reason); one log line per reason a minute
        self.rejections = Rejections(log)
        self.transport: MqttTransport | None = None
        self.intake: Intake | None = None
        self.dispatcher: Dispatcher | None = None
        self._scheduler: object | None = None
        self.ready = threading.Event()
        self._consent_loader: threading.Thread | None = None  # the start-up read of the consent ledger
        self.metrics = EngineMetrics(metrics_registry)
        self.metrics.bind(self.stats, self.health)
        self.metrics_server: MetricsServer | None = None
        self._wait_from: float | None = None  # when the oldest batch not yet flushed was handed over

    # -- public seams ------------------------------------------------------------------
    def add_handler(self, kind: str, handler: Handler) -> None:
        """Handle messages on ``{prefix}/{kind}/+`` (on the engine thread). Before :meth:`start`."""
        if self.dispatcher is not None:
            raise RuntimeError("add handlers before the engine starts")
        self.router.handlers[kind] = handler

    def call_soon(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the engine thread, after what is already queued (any thread)."""
        self._queue.put(job)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stats(self) -> EngineStats:
        rx = self.intake.receiver if self.intake is not None else None
        pipeline = getattr(self, "pipeline", None)
        d = self.dispatcher
        return EngineStats(
            self.batches_processed,
            self.samples_processed,
            self.dropped_batches,
            self._queue.qsize(),
            len(pipeline.detector.users) if pipeline is not None else 0,
            rx.accepted if rx else None,
            rx.duplicates if rx else None,
            self.rejections.total,
            len(self.quarantine),
            dropped_quarantined=self.quarantine.dropped_batches,
            buffered=len(self.buffer),
            rejections=self.rejections.counts(),
            alerts=replace(d.stats) if d is not None else DispatchStats(),
            alerts_in_flight=d.in_flight if d is not None else 0,
            broker_links=self._broker_links(),
        )

    def _broker_links(self) -> dict[str, bool | None]:
        transport, intake = self.transport, self.intake
        rx = intake.receiver if intake is not None else None
        return {
            "alerts": transport.connected if transport is not None else False,
            "ingest": getattr(rx, "connected", None) if rx is not None else False,
        }

    def health(self) -> Health:
        """What ``/healthz`` answers (:func:`.metrics.assess_health`; any thread)."""
        running = self.ready.is_set() and not self._stopping.is_set()
        return assess_health(
            running=running, broker_links=self._broker_links(), loop_age_s=self.metrics.loop_age_s(), stall_s=self.settings.metrics.stall_s
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
        self.persister = StatePersister(
            self.db_path, self.outbox, self.store, today=lambda: self.clock().date(), call_soon=self.call_soon,
            chunk_users=self.settings.engine.state_chunk_users,
        )  # fmt: skip
        restored = self.persister.restore(self.settings.detector)  # chunks of users, each at its ingest-log position
        detector = restored.detector
        m = self.settings.mqtt
        # Refuse an open broker off loopback before connecting (pure check, broker.py).
        check_broker_security(self.url, m.username, conf=self.broker_conf)
        if self.ingest_url != self.url:
            check_broker_security(self.ingest_url, m.username)
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
            on_reconnect=lambda: self._queue.put(self._announce_engine),
            on_connection_lost=lambda: self._queue.put(self._connection_lost),
        )
        self.dispatcher = Dispatcher.from_settings(
            self.settings, self.outbox, self.ledger, self.transport, clock=self.clock, observe_delivery_s=self.metrics.alert_delivery.observe
        )
        self.pipeline = Pipeline(detector, self.dispatcher)
        self.status = StatusPublisher(
            self.topics,
            self.consent,
            lambda user: self.pipeline.detector.baseline_ready(user),
            self._publish_status,
            quarantine=self.quarantine,
        )
        self.transport.subscribe(self.router.subscriptions())
        # Nothing is acknowledged before it is durable: the ingest log syncs each batch before
        # its PUBACK; the batches after the last snapshot are replayed now (docs/INGEST.md).
        self.intake = Intake(
            self.state_dir / "ingest-log", self.topics, lambda b, seq: self._queue.put(_BatchJob(self, b, seq, time.monotonic()))
        )
        self.intake.recover(restored.replay_after, self._on_batch, held=restored.holds)
        self.applied_seq = max(self.applied_seq, restored.last_seq)
        self._truncate_seq = restored.replay_after
        del restored
        self.flush()
        self.intake.connect(
            self.ingest_url, m, self.protocol, clock=self.clock, window=self.settings.engine.time_window(), rejections=self.rejections,
            on_reconnect=lambda: self._queue.put(self._announce_users),  # resubscribed
        )  # fmt: skip
        from apscheduler.schedulers.background import BackgroundScheduler

        e = self.settings.engine
        sched = BackgroundScheduler(timezone="UTC")
        sched.add_job(lambda: self._queue.put(self.tick), "interval", seconds=e.tick_s, id="tick", max_instances=1, coalesce=True)
        sched.add_job(lambda: self._queue.put(self.persist), "interval", seconds=e.persist_s, id="persist", max_instances=1, coalesce=True)
        sched.start()
        self._scheduler = sched
        self._queue.put(self._announce)
        self._queue.put(self.dispatcher.pump)  # undelivered alerts from before a restart, same ids
        self._serve_metrics()
        return self

    def _serve_metrics(self) -> None:
        ms = self.settings.metrics
        if not ms.enabled:
            return
        try:
            self.metrics_server = MetricsServer(self.metrics, ms.host, ms.port).start()
        except OSError as exc:
            # Alerts matter more than their metrics: run on, and say so (a health probe then fails).
            log.error("metrics endpoint not started on %s:%d: %s (set metrics.port, or metrics.enabled = false)", ms.host, ms.port, exc.strerror or exc)
            return
        log.info("metrics on %s/metrics, health on %s/healthz", self.metrics_server.url, self.metrics_server.url)

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
                self.metrics.beat()
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
        self.metrics.beat()
        try:
            if len(self.buffer) and not isinstance(job, _BatchJob):
                self.flush()  # every other job sees the batches received before it
            job()
        except StresswatchError as exc:
            log.warning("%s", exc)
        except Exception as exc:  # noqa: BLE001 - the engine never dies of one job; per-user faults are caught below it
            self.faults.fault(getattr(job, "__name__", type(job).__name__), exc)

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)  # type: ignore[attr-defined]
            self._scheduler = None
        if self.intake is not None:
            self.intake.close()  # synced and acknowledged before the receiver disconnects
        self._run_queued(until_stopped=False)  # batches already received are processed, not lost
        self.flush()
        self.persist(wait=True)
        self.persister.close()
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
        """Save the detector state, once the samples before it are stored (see :mod:`.persist`)."""
        started = time.monotonic()
        now = self.clock()
        # Consent can also end without a message to this engine (expiry; a revocation written
        # into a ledger file it shares): forget those users before saving. From the consent
        # cache, which the status sweep refreshes from the ledger: a ledger read per user here
        # stalled the engine ~8 s per save at 100,000 users (docs/SCALING.md).
        users = self.pipeline.detector.users
        for user in [u for u, ok in zip(users, self.consent.processing_users(users, now).tolist()) if not ok]:
            self.forget(user)
        if self.persister.saving and not wait:
            return  # the save under way goes on; what changed since is saved by the next
        seq, intake = self.applied_seq, self.intake
        assert intake is not None
        intake.log.rotate()
        # The log keeps the segments of one more interval than the snapshot needs: a batch
        # whose PUBACK was lost in a crash is redelivered, and is recognised by them.
        observe = self.metrics.state_save.observe

        def saved() -> None:  # on the snapshot thread, once every chunk of this save is stored
            observe(time.monotonic() - started)
            drop_through, self._truncate_seq = self._truncate_seq, seq
            intake.log.truncate_through(drop_through)

        self.persister.save(lambda: self.pipeline.detector, lambda: self.applied_seq, now, wait=wait, then=saved)

    def flush(self) -> None:
        """Give every pending batch to the detector, as one frame. A fault is isolated to the
        users whose data caused it (:mod:`.quarantine`); everyone else's batch goes on."""
        if not len(self.buffer):
            return
        batches = self.buffer.take()
        self._flushed_at = time.monotonic()
        wait_from, self._wait_from = self._wait_from, None
        self.batches_processed += len(batches)
        frame, batches, unreadable = readable_frame(batches)
        for user, exc in unreadable.items():
            self._quarantine(user, "reading an ingest batch", exc)
        if frame is None:
            return
        for part, out in detect_isolated(self.pipeline, frame, self._quarantine):
            dispatch_isolated(self.pipeline, out, self._quarantine)
            self.persister.add_samples(part)
            self.samples_processed += part.height
        self.status.after_flush(list(dict.fromkeys(b.user for b in batches)), self.clock())
        if wait_from is not None:
            self.metrics.waited(time.monotonic() - wait_from)

    def _quarantine(self, user: str, where: str, exc: BaseException) -> None:
        if self.quarantine.add(user, where, exc):
            self.forget(user)
            self.status.update(user, self.clock())

    def _on_batch(self, batch: IngestBatch, seq: int) -> None:
        self.applied_seq = seq
        if batch.user in self.quarantine:
            self.quarantine.dropped_batches += 1
            self.batches_processed += 1
            return
        try:
            state = self.consent.state(batch.user)
            allowed = state.allows_processing(self.clock())
            if allowed:
                self.pipeline.place(batch.user, state)  # time-of-day slots in the person's own zone
        except Exception as exc:  # noqa: BLE001 - a stored consent state that cannot be read
            self._quarantine(batch.user, "reading consent", exc)
            return
        if not allowed:  # SPEC: consent gates the whole engine
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
        self._announce_engine()
        self._announce_users()

    def _announce_engine(self) -> None:
        """The engine's own status, on the alerts-and-consent broker (start, reconnect)."""
        assert self.transport is not None
        self.transport.publish(self.topics.engine_status, ENGINE_ONLINE, qos=1, retain=True)

    def _announce_users(self) -> None:
        """On the ingest broker (start, reconnect to it): "online", the companions' cue to
        send again what that broker acknowledged but the engine never confirmed (it may have
        dropped it while the engine was not subscribed; docs/BROKER.md), then every user's status.

        The consent ledger is read in one query on a thread of its own, and each slice of
        states is applied to the consent cache and its statuses published by a job queued
        behind the ingest jobs, so the engine is live while they go out (a ledger read and a
        publish per user before going live was most of a 72-s start at 100,000 users)."""
        self._publish_status(self.topics.engine_status, ENGINE_ONLINE)
        if self._consent_loader is not None and self._consent_loader.is_alive():
            return  # the read under way announces everyone
        self.consent.begin_load()
        self._consent_loader = threading.Thread(target=self._read_consent, name="consent-load", daemon=True)
        self._consent_loader.start()

    def _read_consent(self) -> None:
        """The consent loader's thread (its own ledger connection); at most two slices wait."""
        room = threading.Semaphore(2)
        try:
            with ConsentLedger(self.db_path) as ledger:
                states = ledger.iter_states()
                while not self._stopping.is_set():
                    chunk = list(itertools.islice(states, ANNOUNCE_SLICE))
                    room.acquire()
                    self._queue.put(partial(self._consent_slice, chunk, room, last=len(chunk) < ANNOUNCE_SLICE))
                    if len(chunk) < ANNOUNCE_SLICE:
                        return
        except Exception as exc:  # noqa: BLE001 - the cache then reads the ledger user by user, as before
            log.warning("reading consent in bulk: %s", exc)
            self._queue.put(self.consent.end_load)

    def _consent_slice(self, states: list[ConsentState], room: threading.Semaphore, *, last: bool) -> None:
        try:
            self.status.announce(self.consent.load(states), self.clock())
        finally:
            room.release()
            if last:
                self.consent.end_load()

    def _publish_status(self, topic: str, body: bytes) -> None:
        """Per-user status topics live on the ingest broker with the traffic they describe:
        one retained message per user, rewritten at every engine start, is more than a broker
        that saves after every change can take at 100,000 users (docs/BROKER.md). Before the
        ingest connection exists (replay at start) nothing is published: the announce follows."""
        receiver = self.intake.receiver if self.intake is not None else None
        if receiver is not None:
            receiver.publish_retained(topic, body)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """paho's thread: only enqueue, to the handler for the topic's kind."""
        job = self.router.route(topic, payload)
        if job is not None:
            self._queue.put(job)

    def _message_fault(self, kind: str, who: str, exc: BaseException) -> None:
        """A user's consent message that cannot be applied quarantines that user; any other
        message's fault is logged (rate-limited) and the message dropped."""
        if kind == "consent":
            self._quarantine(who, "applying a consent message", exc)
        else:
            self.faults.fault(f"{kind} message from {who}", exc)

    def forget(self, user: str) -> None:
        """Drop the user from memory (pending batches, detector, unsaved samples)."""
        self.buffer.drop_user(user)
        self.pipeline.forget(user)
        self.persister.drop_user(user)

    def erase_user(self, user: str) -> dict[str, int]:
        """Remove the user from every store this engine keeps, and clear their status topic."""
        self.forget(user)
        self.consent.drop(user)
        removed = erase_user(
            user,
            persister=self.persister,
            ledger=self.ledger,
            outbox=self.outbox,
            store=self.store,
            detector_settings=self.settings.detector,
            now=self.clock(),
        )
        if self.intake is not None:
            self.intake.log.erase(user)  # the raw batches kept for a restart go too
        self.status.clear(user)
        return removed

    def user_status(self, user: str, now: datetime) -> str:
        return self.status.status_of(user, now)


class _BatchJob:
    """A received batch on the engine's work queue (told apart from other jobs by its type)."""

    __slots__ = ("engine", "batch", "seq", "handed_at")

    def __init__(self, engine: Engine, batch: IngestBatch, seq: int, handed_at: float) -> None:
        self.engine = engine
        self.batch = batch
        self.seq = seq
        self.handed_at = handed_at  # monotonic: when the intake handed it over (durable, acknowledged)

    def __call__(self) -> None:
        engine = self.engine
        engine._on_batch(self.batch, self.seq)
        if engine._wait_from is None and len(engine.buffer):  # in order: the first buffered since a flush is the oldest
            engine._wait_from = self.handed_at


__all__ = ["ENGINE_OFFLINE", "ENGINE_ONLINE", "Engine", "EngineStats", "Handler"]
