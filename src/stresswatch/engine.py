"""The pipeline: source -> detector -> consent gate (at send time) -> transport.

The same :class:`Pipeline` object runs in the demo, in a replay and in the tests; only its
edges differ (the source it is fed, the transport it sends through, the clock).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from .alerts import checkin, replies
from .alerts.dispatch import Dispatcher
from .alerts.lifecycle import EscalationPolicy
from .alerts.outbox import Outbox
from .alerts.topics import Topics
from .alerts.transport import MqttTransport, Transport
from .broker import check_broker_security, private_client_id
from .config import Settings
from .consent.gate import GateDecision, Verdict, alert_wire, decide
from .consent.ledger import ConsentLedger
from .consent.state import ConsentState, Status
from .consent.wire import decode_consent
from .detect import Detector, DetectorOutput
from .errors import ParseError, StresswatchError
from .ingest import IngestBatch, IngestReceiver
from .model import SAMPLES_SCHEMA, WINDOW_SCHEMA, AlertDecision
from .sources import Source
from .store import SampleStore

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class AlertOutcome:
    decision: AlertDecision
    gate: GateDecision
    decided_at: datetime


ALERT_OUTCOME_SCHEMA: dict[str, pl.DataType] = {
    "alert_id": pl.String(),
    "user": pl.String(),
    "raised_at": pl.Datetime("ns", "UTC"),
    "episode_start": pl.Datetime("ns", "UTC"),
    "level": pl.String(),
    "reasons": pl.List(pl.String()),
    "score": pl.Float64(),
    "consent": pl.String(),
    "sent": pl.Boolean(),
    "recipients": pl.List(pl.String()),
}


@dataclass
class PipelineReport:
    """Everything a run produced, in order. Windows are kept only if asked (replay)."""

    windows: list[pl.DataFrame] = field(default_factory=list)
    outcomes: list[AlertOutcome] = field(default_factory=list)
    n_windows: int = 0
    users: set[str] = field(default_factory=set)

    def windows_frame(self) -> pl.DataFrame:
        frame = pl.concat([pl.DataFrame(schema=WINDOW_SCHEMA), *self.windows], how="vertical")
        return frame.sort("user", "window_start")

    def alerts_frame(self) -> pl.DataFrame:
        rows = [
            {
                "alert_id": o.decision.alert_id,
                "user": o.decision.user,
                "raised_at": o.decision.raised_at,
                "episode_start": o.decision.episode_start,
                "level": o.decision.level.value,
                "reasons": [r.value for r in o.decision.reasons],
                "score": o.decision.score,
                "consent": o.gate.verdict.value,
                "sent": o.gate.allowed,
                "recipients": list(o.gate.recipients),
            }
            for o in self.outcomes
        ]
        return pl.DataFrame(rows, schema=ALERT_OUTCOME_SCHEMA).sort("raised_at", "user")

    @property
    def sent(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if o.gate.allowed]

    @property
    def withheld(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if not o.gate.allowed]


class Pipeline:
    """Wires the seams. ``ledger`` None means no one has consented (every alert withheld)."""

    def __init__(
        self,
        detector: Detector,
        transport: Transport,
        *,
        ledger: ConsentLedger | None = None,
        topics: Topics | None = None,
        clock: Clock = utc_now,
        alert_expiry_s: int = 24 * 3600,
        keep_windows: bool = False,
        on_alert: Callable[[AlertOutcome], None] | None = None,
        sink: Callable[[AlertDecision], None] | None = None,
    ) -> None:
        """``sink``: hand each raised alert to it (the engine's durable dispatcher, which gates
        and publishes later, at send time) instead of gating and publishing here."""
        self.detector = detector
        self.transport = transport
        self.ledger = ledger
        self.topics = topics or Topics()
        self.clock = clock
        self.alert_expiry_s = alert_expiry_s
        self.on_alert = on_alert
        self.report = PipelineReport()
        self._keep_windows = keep_windows
        self._sink = sink
        self._sink_many: Callable[[list[AlertDecision]], object] | None = None

    def process(self, batch: pl.DataFrame) -> DetectorOutput:
        """Feed one batch; send what it decided."""
        if batch.height:
            self.report.users.update(batch.get_column("user").unique().to_list())
        return self._handle(self.detector.update(batch))

    def finish(self) -> DetectorOutput:
        """End of input: finish open windows, send their alerts, wait for the broker's acks."""
        out = self._handle(self.detector.flush())
        self.transport.flush()
        return out

    def advance(self, now: datetime, grace_s: int = 60) -> DetectorOutput:
        """Live tick: finish windows that ended ``grace_s`` before ``now`` without more data."""
        return self._handle(self.detector.advance(int(now.timestamp() * 1e9), grace_s))

    async def run(self, sources: Iterable[Source]) -> PipelineReport:
        for source in sources:
            async for batch in source:
                self.process(batch)
        self.finish()
        return self.report

    def _handle(self, out: DetectorOutput) -> DetectorOutput:
        self.report.n_windows += out.windows.height
        if self._keep_windows and out.windows.height:
            self.report.windows.append(out.windows)
        if self._sink_many is not None and out.alerts:
            self._sink_many(list(out.alerts))  # one detector output: one outbox transaction
            return out
        for decision in out.alerts:
            self._send(decision)
        return out

    def _send(self, decision: AlertDecision) -> None:
        if self._sink is not None:
            self._sink(decision)
            return
        # SPEC: consent is checked at send time, reading the ledger now, not when raised.
        now = self.clock()
        state = self.ledger.state(decision.user) if self.ledger is not None else None
        gate = decide(state, decision, now)
        if gate.allowed and gate.payload is not None:
            payload = alert_wire(gate.payload)
            for worker in gate.recipients:
                self.transport.publish(self.topics.alerts(worker), payload, qos=1, expiry_s=self.alert_expiry_s)
        outcome = AlertOutcome(decision, gate, now)
        self.report.outcomes.append(outcome)
        if self.on_alert:
            self.on_alert(outcome)


__all__ = ["ALERT_OUTCOME_SCHEMA", "AlertOutcome", "Engine", "Pipeline", "PipelineReport", "Verdict", "utc_now"]


# -- the long-running service -------------------------------------------------------------
log = logging.getLogger("stresswatch.engine")

ENGINE_ONLINE = b'{"schema_version":1,"status":"online"}'
ENGINE_OFFLINE = b'{"schema_version":1,"status":"offline"}'


class Engine:
    """``stresswatch engine``: ingest -> detector -> durable outbox -> consent gate -> MQTT.

    All state changes happen on the thread that calls :meth:`run` (paho callbacks and the
    apscheduler jobs only enqueue work), so SQLite connections and the detector are used
    from one thread and a consent change is always recorded before the next publish.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        url: str,
        protocol: str | None = None,
        clock: Clock = utc_now,
        state_dir: Path | None = None,
        broker_conf: Path | None = None,
    ) -> None:
        """``broker_conf``: the broker's mosquitto.conf, if the operator has it, for the
        security check (no anonymous listener off loopback)."""
        self.settings = settings
        self.broker_conf = broker_conf
        self.url = url
        self.protocol = protocol or settings.mqtt.protocol
        self.clock = clock
        self.topics = Topics(settings.mqtt.prefix)
        self.state_dir = Path(state_dir or settings.store.state_dir)
        self.db_path = self.state_dir / "stresswatch.sqlite"
        self.store = SampleStore(self.state_dir) if settings.engine.keep_samples else None
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._status: dict[str, str] = {}
        self._samples: list[pl.DataFrame] = []
        self._consent_cache: dict[str, ConsentState] = {}
        self._pending: list[IngestBatch] = []  # consented batches not yet given to the detector
        self._pending_samples = 0
        self.dropped_batches = 0  # from users whose consent does not allow processing
        self.transport: MqttTransport | None = None
        self.receiver: IngestReceiver | None = None
        self.dispatcher: Dispatcher | None = None
        self._scheduler: object | None = None
        self.ready = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Engine:
        """Open the stores, restore the detector, connect and subscribe. Call :meth:`run` from
        the same thread: the SQLite connections belong to it."""
        self.ledger = ConsentLedger(self.db_path)
        self.outbox = Outbox(self.db_path)
        blob = self.outbox.load_detector()
        detector = Detector.from_bytes(blob, self.settings.detector) if blob else Detector(self.settings.detector)
        self.pipeline = Pipeline(detector, _NoTransport(), ledger=self.ledger, topics=self.topics, clock=self.clock)
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
        a = self.settings.alerts
        self.dispatcher = Dispatcher(
            self.outbox,
            self.ledger,
            self.transport,
            clock=self.clock,
            topics=self.topics,
            groups=self.settings.groups,
            policy=EscalationPolicy(a.escalate_after_s, a.renotify_after_s, a.max_reminders, a.cooldown_s, a.checkin_cooldown_s),
            alert_expiry_s=m.alert_expiry_s,
            resend_after_s=a.resend_after_s,
        )
        self.pipeline._sink = self.dispatcher.raise_alert
        self.pipeline._sink_many = self.dispatcher.raise_alerts
        self.transport.subscribe([f"{self.topics.prefix}/{t}/+" for t in ("consent", "acks", "checkin")])
        self.receiver = IngestReceiver(
            self.url,
            lambda batch: self._queue.put(_BatchJob(self, batch)),
            topics=self.topics,
            username=m.username,
            password=m.password,
            protocol=self.protocol,
            client_id=private_client_id(f"{m.client_id}-ingest", m.password),
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
                    while not self._stopping.is_set():  # drain what is queued, then publish once
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is not None:
                            self._run_job(nxt)
                if self._pending and time.monotonic() - self._flushed_at >= self.FLUSH_S:
                    self._flush_pending()
                self.dispatcher.pump()
        finally:
            self.shutdown()

    def _run_job(self, job: Callable[[], None]) -> None:
        try:
            if self._pending and not isinstance(job, _BatchJob):
                self._flush_pending()  # every other job sees the batches received before it
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
        while True:  # batches already received are processed, not lost
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._run_job(job)
        self._flush_pending()
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
        self.outbox.close()
        self.ledger.close()

    # -- jobs (engine thread) ------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        self.pipeline.advance(now, self.settings.engine.grace_s)
        assert self.dispatcher is not None
        self.dispatcher.run_due()
        self._sweep_status(now)

    # Status is published when it changes. Consent changes arrive as jobs that publish it
    # themselves, and a user's first batch or end of calibration is seen in _flush_pending; what
    # only time changes (a consent expiring, a ledger written by another process) is found by
    # this sweep, which re-reads a bounded slice of the users per tick (all of them per tick up
    # to STATUS_SWEEP users): reading every user's consent every tick cost O(users) SQLite
    # reads and was the largest cost at 3,000 users (docs/SCALING.md).
    STATUS_SWEEP = 2_000

    def _sweep_status(self, now: datetime) -> None:
        users = list(self._status)
        if len(users) <= self.STATUS_SWEEP:
            chosen = users
        else:
            start = getattr(self, "_sweep_at", 0) % len(users)
            chosen = (users[start:] + users[:start])[: self.STATUS_SWEEP]
            self._sweep_at = start + self.STATUS_SWEEP
        for user in chosen:  # one ledger read each: it refreshes the cache and the status
            st = self.ledger.state(user)
            self._consent_cache[user] = replace(st, history=())
            self._publish_status(user, now, state=st)

    def persist(self, *, wait: bool = False) -> None:
        """Save detector state (and buffered samples). The detector is serialised here, on the
        engine thread; the SQLite write of the blob (hundreds of MB at 100,000 users, seconds)
        runs on a writer thread with its own connection unless ``wait``, so ingest does not
        stall behind it. One save at a time, in order; erasure and shutdown wait for it."""
        now = self.clock()
        # Consent can also end without a message to this engine (expiry; a revocation written
        # into a ledger file it shares): forget those users before saving. From the consent
        # cache, which the status sweep refreshes from the ledger: a ledger read per user here
        # stalled the engine ~8 s per save at 100,000 users (docs/SCALING.md).
        for user in [u for u in self.pipeline.detector.users if not self._may_process(u, now)]:
            self._forget(user)
        blob = self.pipeline.detector.to_bytes()
        self._join_saver()
        if wait:
            self.outbox.save_detector(blob, now)
        else:
            self._saver = threading.Thread(target=self._save_detector, args=(blob, now), name="detector-save", daemon=True)
            self._saver.start()
        if self.store is not None and self._samples:
            frames, self._samples = self._samples, []
            self.store.add(pl.concat(frames, how="vertical"))

    def _connection_lost(self) -> None:
        if self.dispatcher is not None:
            n = self.dispatcher.connection_lost()
            log.warning("broker connection lost: %d recently acknowledged alert(s) will be published again", n)

    _saver: threading.Thread | None = None

    def _save_detector(self, blob: bytes, now: datetime) -> None:
        try:
            with Outbox(self.db_path) as outbox:
                outbox.save_detector(blob, now)
        except StresswatchError as exc:  # the next save tries again; the engine keeps running
            log.warning("saving detector state: %s", exc)

    def _join_saver(self) -> None:
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def _announce(self) -> None:
        assert self.transport is not None
        self.transport.publish(self.topics.engine_status, ENGINE_ONLINE, qos=1, retain=True)
        now = self.clock()
        for user in self.ledger.users():  # the read also warms the consent cache for ingest
            st = self.ledger.state(user)
            self._consent_cache[user] = replace(st, history=())
            self._publish_status(user, now, force=True, state=st)

    # Batches are checked for consent one by one as they arrive, then given to the detector
    # together: every FLUSH_S (everything received meanwhile), and before any other job. The detector's cost is mostly per call, not per sample: one call per batch could
    # not follow more than a few hundred users (benchmarks/load, docs/SCALING.md).
    MAX_PENDING_SAMPLES = 2_000_000
    # At most this long in the pending list: part of the alert latency budget (1 s). Measured at
    # 100,000 users (benchmarks/load): 0.25 s kept the engine at a full core, 0.5 s at 0.75.
    FLUSH_S = 0.5
    _flushed_at = 0.0

    def _on_batch(self, batch: IngestBatch) -> None:
        now = self.clock()
        if not self._may_process(batch.user, now):  # SPEC: consent gates the whole engine
            self.dropped_batches += 1
            return
        self._pending.append(batch)
        self._pending_samples += len(batch.time_ns)
        if self._pending_samples >= self.MAX_PENDING_SAMPLES:
            self._flush_pending()

    def _may_process(self, user: str, now: datetime) -> bool:
        """``ledger.state(user).allows_processing(now)``, from a per-user cache of the state
        without its event history (a few hundred bytes a user): a ledger read per batch was a
        fifth of the engine's time. Consent that reaches the engine (its consent topic, an
        erasure) drops the entry at once; the status sweep drops the entries it visits, so a
        ledger written by another process is seen within one sweep."""
        cached = self._consent_cache.get(user)
        if cached is None:
            cached = self._consent_cache[user] = replace(self.ledger.state(user), history=())
        return cached.allows_processing(now)

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        batches, self._pending, self._pending_samples = self._pending, [], 0
        self._flushed_at = time.monotonic()
        frame = _frame_of(batches)
        self.pipeline.process(frame)
        if self.store is not None:
            self._samples.append(frame)
        now = self.clock()
        detector = self.pipeline.detector
        for user in dict.fromkeys(b.user for b in batches):
            known = self._status.get(user)
            if known is None or (known == "calibrating" and detector.baseline_ready(user)):
                self._publish_status(user, now)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """paho's thread: only enqueue."""
        head, _, who = topic.rpartition("/")
        if head == f"{self.topics.prefix}/consent":
            self._queue.put(lambda: self._on_consent(who, payload, topic))
        elif head == f"{self.topics.prefix}/acks":
            self._queue.put(lambda: self._on_ack(who, payload, topic))
        elif head == f"{self.topics.prefix}/checkin":
            self._queue.put(lambda: self._on_checkin(who, payload, topic))

    def _on_consent(self, user: str, payload: bytes, topic: str) -> None:
        if not payload:  # an empty retained message: the user erased their data
            self.erase_user(user)
            return
        try:
            events = decode_consent(payload, topic_user=user, topic=topic)
        except ParseError as exc:
            log.warning("ignored consent message: %s", exc)
            return
        self._consent_cache.pop(user, None)
        if self.ledger.extend(events):
            now = self.clock()
            if not self.ledger.state(user).allows_processing(now):
                self._forget(user)
            self._publish_status(user, now)

    def _on_ack(self, worker: str, payload: bytes, topic: str) -> None:
        """An ack, resolve or list request: act, then tell the worker what was recorded."""
        assert self.dispatcher is not None and self.transport is not None
        reply = replies.answer(self.dispatcher, worker, payload, topic=topic)
        if not reply.ok:
            log.warning("ack from %s: %s", worker, reply.error)
        self.transport.publish(self.topics.replies(worker), reply.encode(), qos=1, expiry_s=replies.REPLY_EXPIRY_S)

    def _on_checkin(self, user: str, payload: bytes, topic: str) -> None:
        """The person asked for contact: the same dispatcher (and consent gate) as a detector alert."""
        assert self.dispatcher is not None
        try:
            decision = checkin.decision_for(user, payload, now=self.clock(), topic=topic)
        except ParseError as exc:
            log.warning("ignored check-in: %s", exc)
            return
        self.dispatcher.raise_alerts([decision])

    def _forget(self, user: str) -> None:
        self._pending = [b for b in self._pending if b.user != user]
        self._pending_samples = sum(len(b.time_ns) for b in self._pending)
        self.pipeline.detector = self.pipeline.detector.forget(user)
        self._samples = [f.filter(pl.col("user") != user) for f in self._samples]

    def erase_user(self, user: str) -> dict[str, int]:
        """Remove the user from every store this engine keeps (see :func:`consent.rights.erase_user`)."""
        from .consent.rights import erase_stores

        now = self.clock()
        self._join_saver()  # a save in flight holds the user's state: it must land before erasure
        self._forget(user)
        self._status.pop(user, None)
        self._consent_cache.pop(user, None)
        removed = erase_stores(
            user, ledger=self.ledger, outbox=self.outbox, store=self.store, now=now, detector_settings=self.settings.detector
        )
        self.outbox.save_detector(self.pipeline.detector.to_bytes(), now)
        if self.transport is not None:
            self.transport.publish(self.topics.status(user), b"", qos=1, retain=True)
        return removed

    def user_status(self, user: str, now: datetime, state: ConsentState | None = None) -> str:
        """``state``: the user's consent state if the caller has just read it."""
        st = state if state is not None else self.ledger.state(user)
        if not st.allows_processing(now):
            return "off"
        if st.status is Status.PAUSED:
            return "paused"
        return "active" if self.pipeline.detector.baseline_ready(user) else "calibrating"

    def _publish_status(self, user: str, now: datetime, *, force: bool = False, state: ConsentState | None = None) -> None:
        status = self.user_status(user, now, state)
        if not force and self._status.get(user) == status:
            return
        self._status[user] = status
        if self.transport is not None:
            body = json.dumps({"schema_version": 1, "status": status, "since": now.isoformat()}).encode()
            self.transport.publish(self.topics.status(user), body, qos=1, retain=True)


class _BatchJob:
    """A received batch on the engine's work queue (told apart from other jobs by its type)."""

    __slots__ = ("engine", "batch")

    def __init__(self, engine: Engine, batch: IngestBatch) -> None:
        self.engine = engine
        self.batch = batch

    def __call__(self) -> None:
        self.engine._on_batch(self.batch)


def _frame_of(batches: list[IngestBatch]) -> pl.DataFrame:
    """One samples frame of many batches (rows in arrival order; the detector sorts by user)."""
    if len(batches) == 1:
        return batches[0].to_frame()
    users: list[str] = []
    sources: list[str] = []
    times: list[int] = []
    metrics: list[str] = []
    values: list[float] = []
    for b in batches:
        n = len(b.time_ns)
        users += [b.user] * n
        sources += [b.source] * n
        times += b.time_ns
        metrics += b.metric  # str-valued enum members are str: polars reads them as is (7x faster than .value)
        values += b.value
    return pl.DataFrame(
        {
            "user": users,
            "time": pl.Series(times, dtype=pl.Int64).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
            "metric": metrics,
            "value": pl.Series(values, dtype=pl.Float64),
            "source": sources,
        },
        schema=SAMPLES_SCHEMA,
    )


class _NoTransport:
    """The engine's pipeline never publishes itself: its sink is the dispatcher."""

    def publish(self, *a: object, **k: object) -> None:
        raise AssertionError("the engine publishes through its dispatcher")

    def flush(self, timeout_s: float = 10.0) -> None:
        return None

    def close(self) -> None:
        return None
