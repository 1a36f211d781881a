"""The partitioned engine: ``stresswatch engine --cluster nats://...`` (docs/CLUSTER.md).

One process owns some of the cluster's partitions (leases, :mod:`.lease`). Per owned
partition it keeps what the single-process engine keeps for everyone: a :class:`Detector`, a
durable alert outbox (SQLite in the work directory) behind the one :class:`Dispatcher`, the
de-duplication state and the last applied stream sequence; together they are the
partition's snapshot (:mod:`.snapshot`), saved to the JetStream object store every
``cluster.snapshot_s``. Taking a partition over = load its snapshot, then pull from the
snapshot's sequence: the detector is invariant to chunking and alert ids are stable, so the
replay gives the same windows and alerts. An alert delivery the previous owner got a PUBACK
for after its last snapshot is not published again: a publish-once marker per (alert,
worker, notice) is written to a key-value bucket after the PUBACK and read before each
publish (:class:`MarkedTransport`). Consent is a key-value bucket every engine watches.

Workers' acks, resolves and list requests, users' check-ins and erasures come through the
same partition stream as the user's batches (the bridge routes an ack by the alert index,
``alert id -> partition``, written before an alert is first published): the owner applies
them in stream order, so an ack taken before a crash is replayed from the snapshot's sequence
by the next owner and the alert escalates no further. Per-user status topics are published
by the owner of the user's partition (:mod:`.userstatus`).

All state changes happen on the thread that calls :meth:`ClusterEngine.run`; NATS runs on
its own thread (:mod:`.jetstream`), paho (alerts) on its own.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from ..alerts import replies
from ..alerts.dispatch import Dispatcher
from ..alerts.outbox import Outbox
from ..alerts.topics import Topics
from ..alerts.transport import ACKED, MqttTransport, Receipt, Transport
from ..broker import check_broker_security, private_client_id
from ..clock import Clock, utc_now
from ..config import Settings
from ..consent.state import ConsentState, fold
from ..detect import Detector
from ..engine import handlers
from ..engine.ingest_buffer import IngestBuffer, readable_frame
from ..engine.isolation import detect_isolated, dispatch_isolated
from ..engine.quarantine import Quarantine
from ..engine.routing import FaultLog
from ..engine.status import user_status
from ..errors import ClusterError, ParseError, StresswatchError
from ..ingest import Deduplicator, IngestBatch
from ..pipeline import Pipeline
from ..private_files import private_dir
from ..wire.consent import decode_consent
from ..wire.rejections import Rejections
from .jetstream import Fetched, JetStreamIO, open_ready
from .layout import KIND_ACK, KIND_CHECKIN, KIND_ERASE, KIND_INGEST, KIND_LIST, Layout, partition_of
from .lease import Lease, plan
from .snapshot import Snapshot
from .userstatus import StatusBoard

log = logging.getLogger("stresswatch.cluster")


class ConsentView:
    """Every user's consent from the consent bucket (the user's consent message: all their
    events), kept current by a watch. ``state(user)`` is what the dispatcher's gate reads
    before each publish, so a withdrawal written to the bucket holds at once on whichever
    engine owns the user's partition."""

    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions
        self._states: dict[str, ConsentState] = {}
        self._revisions: dict[str, tuple[int, int]] = {}  # user -> (bucket revision of their last change, partition)
        self.revision = 0
        self.changed: list[str] = []  # users whose consent changed (the engine thread drains it)
        self._lock = threading.Lock()

    def apply(self, user: str, value: bytes | None, revision: int) -> None:
        """A bucket entry (client thread). A value that does not decode counts as no consent."""
        try:
            events = decode_consent(value, topic_user=user) if value else []
            st = replace(fold(user, events), history=())
        except ParseError:
            log.warning("consent of %s in the bucket does not decode: treated as none", user)
            st = ConsentState(user)
        with self._lock:
            if value:
                self._states[user] = st
            else:  # deleted (erasure or no consent): nothing of the user is kept
                self._states.pop(user, None)
            self._revisions[user] = (revision, partition_of(user, self.partitions))
            self.revision = max(self.revision, revision)
            self.changed.append(user)

    def state(self, user: str) -> ConsentState:
        return self._states.get(user) or ConsentState(user)

    def may_process(self, user: str, now: datetime) -> bool:
        return self.state(user).allows_processing(now)

    def has(self, user: str) -> bool:
        """The bucket holds a consent message for ``user``."""
        return user in self._states

    def changed_since(self, revision: int, partition: int) -> list[str]:
        """Users of ``partition`` whose consent changed after bucket revision ``revision``."""
        with self._lock:
            return [u for u, (r, p) in self._revisions.items() if r > revision and p == partition]

    def forget(self, user: str) -> None:
        """Erasure: the user's entry goes (a later write of the bucket brings it back)."""
        with self._lock:
            self._states.pop(user, None)
            self._revisions.pop(user, None)

    def take_changed(self, most: int = 2_000) -> list[str]:
        """Up to ``most`` changed users, oldest first (an engine's start sees every user's key:
        they are handled a slice per loop round, between fetches)."""
        with self._lock:
            out, self.changed = self.changed[:most], self.changed[most:]
        return out


class MarkedTransport:
    """The alert transport with publish-once markers: an alert notice whose marker exists was
    delivered by this partition's previous owner and is acknowledged without publishing; a
    notice the broker acknowledges gets its marker. A crash between a PUBACK and its marker
    can still repeat one notice; the worker client drops it by ``alert_id``. (A notice whose
    PUBACK takes longer than ``alerts.resend_after_s`` is published again by the dispatcher,
    as in the single engine: at least once, the worker client drops the repeat.)"""

    def __init__(self, inner: Transport, jsio: JetStreamIO, layout: Layout) -> None:
        self.inner = inner
        self.jsio = jsio
        self.layout = layout
        self.skipped = 0
        self._indexed: set[str] = set()

    def index(self, alert_id: str, p: int) -> None:
        """Record the alert's partition in the alert index before its first publish, so a
        worker's ack for it is routed to the partition's owner (once per alert per engine;
        alerts are rare)."""
        if alert_id in self._indexed:
            return
        try:
            self.jsio.put(self.layout.alerts, alert_id, str(p).encode())
        except ClusterError:  # NATS away: written when it is back (an ack before that is answered "no alert")
            self.jsio.submit(self.jsio.kv(self.layout.alerts).put(alert_id, str(p).encode()))
        self._indexed.add(alert_id)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: int | None = None) -> Receipt:
        key = self._key(topic, payload)
        if key is not None and self.jsio.get(self.layout.sent, key) is not None:
            self.skipped += 1
            return ACKED
        receipt = self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)
        return _MarkingReceipt(receipt, self, key) if key is not None else receipt

    def mark(self, key: str) -> None:
        """Written at once (one round trip per delivered notice: alerts are rare), so the
        window in which a SIGKILL can leave a delivered notice unmarked is that round trip."""
        try:
            self.jsio.put(self.layout.sent, key, b"1")
        except ClusterError:  # NATS away: write it when it is back
            self.jsio.submit(self.jsio.kv(self.layout.sent).put(key, b"1"))

    @staticmethod
    def alert_id_of(payload: bytes) -> str | None:
        try:
            return str(json.loads(payload)["alert_id"])
        except (ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _key(topic: str, payload: bytes) -> str | None:
        try:
            d = json.loads(payload)
            return Layout.sent_key(str(d["alert_id"]), topic.rsplit("/", 1)[-1], int(d.get("notice", 0)))
        except (ValueError, KeyError, TypeError):
            return None

    def flush(self, timeout_s: float = 10.0) -> None:
        self.inner.flush(timeout_s)

    def close(self) -> None:
        self.inner.close()


class PartitionTransport:
    """One partition's handle on the shared :class:`MarkedTransport`: an alert notice puts
    the alert's partition into the alert index first."""

    def __init__(self, shared: MarkedTransport, p: int) -> None:
        self.shared, self.p = shared, p

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: int | None = None) -> Receipt:
        alert_id = MarkedTransport.alert_id_of(payload) if topic.rsplit("/", 2)[-2:-1] == ["alerts"] else None
        if alert_id is not None:
            self.shared.index(alert_id, self.p)
        return self.shared.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def flush(self, timeout_s: float = 10.0) -> None:
        self.shared.flush(timeout_s)

    def close(self) -> None:  # the shared transport is the engine's to close
        pass


@dataclass
class _Context:
    """What the single engine's handlers (:mod:`stresswatch.engine.handlers`) use of an
    engine, for one partition."""

    dispatcher: Dispatcher
    transport: object
    rejections: Rejections
    topics: Topics
    clock: Clock


class _MarkingReceipt:
    __slots__ = ("receipt", "owner", "key", "marked")

    def __init__(self, receipt: Receipt, owner: MarkedTransport, key: str) -> None:
        self.receipt, self.owner, self.key, self.marked = receipt, owner, key, False

    def is_published(self) -> bool:
        done = self.receipt.is_published()
        if done and not self.marked:
            self.marked = True
            self.owner.mark(self.key)
        return done


@dataclass
class Partition:
    number: int
    db_path: Path
    outbox: Outbox
    pipeline: Pipeline
    sub: object
    lease_rev: int
    lease_until_s: float  # wall clock: past it, another engine may own the partition
    applied_seq: int
    dedup: Deduplicator
    snapshot_seq: int
    previous_snapshot_seq: int = 0
    erased: list[str] = field(default_factory=list)  # erased users the next snapshot confirms
    # the stream's end when the partition was taken: until the replay reaches it, no
    # escalation runs (an ack further on in the stream may already have stopped it)
    replay_until: int = 0
    buffer: IngestBuffer = field(default_factory=IngestBuffer)
    quarantine: Quarantine = field(default_factory=Quarantine)

    @property
    def dispatcher(self) -> Dispatcher:
        return self.pipeline.dispatcher


@dataclass
class ClusterStats:
    owned: tuple[int, ...] = ()
    batches: int = 0
    samples: int = 0
    dropped: int = 0  # no consent to process
    duplicates: int = 0
    takeovers: int = 0
    snapshots: int = 0
    skipped_publishes: int = 0  # notices a previous owner had delivered (publish-once markers)
    acks: int = 0  # workers' acks, resolves and list requests answered
    checkins: int = 0
    erasures: int = 0


class ClusterEngine:
    def __init__(
        self,
        settings: Settings,
        *,
        servers: list[str],
        mqtt_url: str,
        protocol: str | None = None,
        engine_id: str | None = None,
        work_dir: Path | None = None,
        clock: Clock = utc_now,
        publish_windows: bool = False,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``work_dir``: local scratch for the owned partitions' outboxes (the durable copy is
        the snapshot). ``publish_windows``: every window the detector finishes also goes, as
        Arrow IPC, to ``sw.windows.<partition>`` (downstream consumers; tests compare them)."""
        self.settings = settings
        self.layout = Layout.of(settings.cluster)
        self.servers = servers
        self.mqtt_url = mqtt_url
        self.protocol = protocol or settings.mqtt.protocol
        self.engine_id = engine_id or f"{socket.gethostname()}-{os.getpid()}"
        self.work_dir = Path(work_dir or Path(settings.store.state_dir) / "cluster" / self.engine_id)
        self.clock = clock
        self.wall = wall
        self.publish_windows = publish_windows
        self.topics = Topics(settings.mqtt.prefix)
        self.consent = ConsentView(self.layout.partitions)
        self.rejections = Rejections(log)
        self.faults = FaultLog()
        self.parts: dict[int, Partition] = {}
        self.stats = ClusterStats()
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self.jsio: JetStreamIO | None = None
        self.transport: MarkedTransport | None = None
        self._heartbeat_rev: int | None = None
        self.status = StatusBoard(self.topics, self._publish_status)
        self._sweep_at = 0  # where the status sweep goes on (a slice of the owned users per tick)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> ClusterEngine:
        private_dir(self.work_dir)
        for stale in self.work_dir.glob("part-*.sqlite*"):
            stale.unlink()  # a previous run's scratch: the snapshots are the truth
        c, m = self.settings.cluster, self.settings.mqtt
        self.jsio = open_ready(self.servers, self.layout, name=f"stresswatch-engine-{self.engine_id}", retention_s=c.retention_days * 86_400)
        self.jsio.watch(self.layout.consent, self.consent.apply)
        check_broker_security(self.mqtt_url, m.username)
        inner = MqttTransport(
            self.mqtt_url,
            client_id=private_client_id(f"{m.client_id}-{self.engine_id}", m.password),
            username=m.username,
            password=m.password,
            protocol=self.protocol,
            persistent_session=False,
        )
        self.transport = MarkedTransport(inner, self.jsio, self.layout)
        self._leases_round()
        return self

    def request_stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        if self.jsio is None:
            self.start()
        assert self.jsio is not None
        c, e = self.settings.cluster, self.settings.engine
        renew_every = c.lease_ttl_s / 4
        next_lease = next_tick = time.monotonic()
        next_snap = time.monotonic() + c.snapshot_s
        self.ready.set()
        try:
            while not self._stopping.is_set():
                now_m = time.monotonic()
                try:
                    if now_m >= next_lease:
                        next_lease = now_m + renew_every
                        self._leases_round()
                    self._expire_unrenewed()
                    self._consent_changes()
                    got = self.jsio.fetch({p: part.sub for p, part in self.parts.items()}, c.fetch_batch, 0.2)
                    for p, part in self.parts.items():
                        if p not in got:
                            part.replay_until = 0  # nothing more in the stream: caught up
                    for p, fetched in got.items():
                        if p in self.parts:
                            self._apply(self.parts[p], fetched)
                    for part in list(self.parts.values()):
                        self._safely(part, part.dispatcher.pump)
                    if now_m >= next_tick:
                        next_tick = now_m + e.tick_s
                        self.tick()
                    if now_m >= next_snap:
                        next_snap = now_m + c.snapshot_s
                        for p in list(self.parts):
                            self.snapshot(p)
                except ClusterError as exc:  # NATS away or electing a leader: try again shortly
                    self.faults.fault("cluster", exc)
                    time.sleep(0.5)
                if not self.parts:
                    time.sleep(0.2)
        finally:
            self.shutdown()

    def _expire_unrenewed(self) -> None:
        """A partition whose lease could not be renewed before it ran out may already be
        another engine's: stop processing it (fencing by time, besides compare-and-set)."""
        now_s = self.wall()
        for p, part in list(self.parts.items()):
            if part.lease_until_s <= now_s:
                log.warning("partition %d: lease not renewed in time; dropped without saving", p)
                self._drop(p)

    def shutdown(self) -> None:
        """Snapshot and release every owned partition (another engine takes them at once)."""
        for p in list(self.parts):
            try:
                self.snapshot(p)
            except StresswatchError as exc:
                log.warning("partition %d: final snapshot failed (%s)", p, exc)
            self._release(p)
        if self.jsio is not None:
            try:
                self.jsio.delete(self.layout.leases, self.layout.engine_key(self.engine_id))
            except Exception as exc:  # noqa: BLE001
                log.debug("heartbeat delete: %s", exc)
        if self.transport is not None:
            try:
                self.transport.close()
            except StresswatchError as exc:
                log.warning("closing: %s", exc)
            self.transport = None
        if self.jsio is not None:
            self.jsio.close()
            self.jsio = None

    # -- leases ------------------------------------------------------------------------
    def _leases_round(self) -> None:
        jsio, L = self.jsio, self.layout
        assert jsio is not None
        self._renew()
        now_s = self.wall()
        mine = Lease(self.engine_id, now_s + self.settings.cluster.lease_ttl_s)
        hb = jsio.cas(L.leases, L.engine_key(self.engine_id), mine.encode(), self._heartbeat_rev)
        self._heartbeat_rev = hb if hb is not None else jsio.put(L.leases, L.engine_key(self.engine_id), mine.encode())
        live = self._live_engines(now_s)
        seen = jsio.leases([L.lease_key(p) for p in range(L.partitions)])
        leases = {p: seen[L.lease_key(p)][0] for p in range(L.partitions)}
        todo = plan(leases, self.engine_id, set(self.parts), live, now_s, L.partitions)
        renewed = time.monotonic()
        for p in todo.take:
            if time.monotonic() - renewed > self.settings.cluster.lease_ttl_s / 4:
                self._renew()  # taking several partitions takes a while: keep the others'
                renewed = time.monotonic()
            _, rev = seen[L.lease_key(p)]
            until = self.wall() + self.settings.cluster.lease_ttl_s
            got = jsio.cas(L.leases, L.lease_key(p), Lease(self.engine_id, until).encode(), rev)
            if got is not None:
                self._take(p, got, until)
        for p in todo.release:
            self.snapshot(p)
            self._release(p)
        self.stats.owned = tuple(sorted(self.parts))

    def _renew(self) -> None:
        """Renew every owned lease; a failed compare-and-set means another engine owns it now."""
        jsio, L = self.jsio, self.layout
        assert jsio is not None
        for p, part in list(self.parts.items()):
            until = self.wall() + self.settings.cluster.lease_ttl_s
            rev = jsio.cas(L.leases, L.lease_key(p), Lease(self.engine_id, until).encode(), part.lease_rev)
            if rev is None:
                log.warning("partition %d: lease lost to another engine; dropped without saving", p)
                self._drop(p)
            else:
                part.lease_rev, part.lease_until_s = rev, until

    def _live_engines(self, now_s: float) -> int:
        assert self.jsio is not None
        got = self.jsio.leases(self.jsio.keys(self.layout.leases, "engine."))
        return max(1, sum(1 for lease, _ in got.values() if lease is not None and lease.live(now_s)))

    def _take(self, p: int, lease_rev: int, lease_until_s: float) -> None:
        """Load partition ``p``'s snapshot and pull from its sequence (the replay)."""
        jsio, L = self.jsio, self.layout
        assert jsio is not None and self.transport is not None
        started = time.monotonic()
        data = jsio.get_object(L.snapshot_name(p))
        snap = Snapshot.decode(data) if data else None
        db_path = self.work_dir / f"part-{p}.sqlite"
        for f in self.work_dir.glob(f"part-{p}.sqlite*"):
            f.unlink()
        if snap is not None:
            db_path.write_bytes(snap.outbox)
            os.chmod(db_path, 0o600)
        outbox = Outbox(db_path)
        detector = Detector.from_bytes(snap.detector, self.settings.detector) if snap else Detector(self.settings.detector)
        dispatcher = Dispatcher.from_settings(self.settings, outbox, self.consent, PartitionTransport(self.transport, p), clock=self.clock)  # type: ignore[arg-type]
        seq = snap.seq if snap else 0
        sub = jsio.open_partition(p, seq)
        part = Partition(
            p, db_path, outbox, Pipeline(detector, dispatcher), sub, lease_rev, lease_until_s, seq,
            Deduplicator.from_state(snap.dedup) if snap else Deduplicator(), seq,
        )  # fmt: skip
        try:
            part.replay_until = jsio.partition_info(p)[0]
        except ClusterError:  # unknown: the first empty fetch says the replay is over
            part.replay_until = 1 << 62
        self.parts[p] = part
        self.stats.takeovers += 1
        log.info(
            "partition %d taken (snapshot at sequence %d, %s) in %.2f s", p, seq, f"from {snap.owner}" if snap else "new",
            time.monotonic() - started,
        )  # fmt: skip
        self._safely(part, dispatcher.pump)  # deliveries pending in the snapshot: markers skip what was delivered
        # consent changed while the partition had no owner: those users' statuses now
        for user in self.consent.changed_since(snap.consent_revision if snap else 0, p):
            self._status_of(part, user, force=True)

    def _drop(self, p: int) -> None:
        part = self.parts.pop(p, None)
        if part is None:
            return
        assert self.jsio is not None
        self.jsio.close_partition(part.sub)
        part.outbox.close()
        self.status.forget(part.pipeline.detector.users)

    def _release(self, p: int) -> None:
        part = self.parts.get(p)
        if part is None:
            return
        rev = part.lease_rev
        self._drop(p)
        assert self.jsio is not None
        try:
            self.jsio.delete(self.layout.leases, self.layout.lease_key(p), last=rev)
        except Exception as exc:  # noqa: BLE001 - it expires anyway
            log.debug("lease delete: %s", exc)

    # -- ingest (engine thread) --------------------------------------------------------
    def _apply(self, part: Partition, fetched: Fetched) -> None:
        now = self.clock()
        window = self.settings.engine.time_window()
        for item in fetched.items:
            if item.seq <= part.applied_seq:
                continue  # redelivered: already in the detector
            part.applied_seq = item.seq
            if item.kind != KIND_INGEST:
                self._request(part, item.kind, item.user, item.payload, item.reply_to)
                if self.parts.get(part.number) is not part:
                    return  # the lease was lost at an erasure's snapshot: the next owner replays it
                continue
            try:
                batch = IngestBatch.decode(item.payload, topic=self.topics.ingest(item.user), now=now, window=window)
            except (ParseError, ValueError) as exc:
                self.rejections.record("ingest", exc if isinstance(exc, ParseError) else "bad_id", user=None)
                continue
            if not part.dedup.first_time(batch):
                self.stats.duplicates += 1
                continue
            self.stats.batches += 1
            if batch.user in part.quarantine or not self.consent.may_process(batch.user, now):
                self.stats.dropped += 1
                continue
            part.buffer.add(batch)
        self._flush(part)
        assert self.jsio is not None
        self.jsio.ack(fetched.last)  # the detector has taken everything up to it

    def _flush(self, part: Partition) -> None:
        if not len(part.buffer):
            return
        frame, batches, unreadable = readable_frame(part.buffer.take())
        on_fault = self._on_fault(part)
        for user, exc in unreadable.items():
            on_fault(user, "reading an ingest batch", exc)
        if frame is None:
            return
        for samples, out in detect_isolated(part.pipeline, frame, on_fault):
            dispatch_isolated(part.pipeline, out, on_fault)
            self.stats.samples += samples.height
            self._windows_out(part.number, out.windows)
        now = self.clock()
        for user in dict.fromkeys(b.user for b in batches):  # first seen, or calibration over
            known = self.status.known(user)
            if known is None or (known == "calibrating" and part.pipeline.detector.baseline_ready(user)):
                self._status_of(part, user)

    def _windows_out(self, p: int, windows: object) -> None:
        if not self.publish_windows or not getattr(windows, "height", 0):
            return
        buf = io.BytesIO()
        windows.write_ipc(buf)  # type: ignore[attr-defined]
        assert self.jsio is not None
        self.jsio.publish_later(self.layout.windows_subject(p), buf.getvalue(), give_up_s=None)  # through any outage

    def _on_fault(self, part: Partition) -> Callable[[str, str, BaseException], None]:
        def fault(user: str, where: str, exc: BaseException) -> None:
            if part.quarantine.add(user, where, exc):
                part.buffer.drop_user(user)
                part.pipeline.forget(user)
                self._status_of(part, user)

        return fault

    def _consent_changes(self) -> None:
        now = self.clock()
        for user in dict.fromkeys(self.consent.take_changed()):
            part = self.parts.get(partition_of(user, self.layout.partitions))  # a user's data is only in their partition
            if part is not None and not self.consent.may_process(user, now):
                part.buffer.drop_user(user)
                part.pipeline.forget(user)
            if part is not None and self.consent.has(user):  # a deleted key: the erasure marker clears the topic
                self._status_of(part, user)

    # -- workers' and users' requests (engine thread, in the partition's stream order) ----
    def _request(self, part: Partition, kind: str, who: str, payload: bytes, reply_to: str = "") -> None:
        self._flush(part)  # the batches before it in the stream are applied first
        ctx = _Context(part.dispatcher, self.transport, self.rejections, self.topics, self.clock)
        try:
            if kind == KIND_ACK:
                self._ack(part, ctx, who, payload)
            elif kind == KIND_CHECKIN:
                handlers.on_checkin(ctx, who, payload, self.topics.checkin(who))  # type: ignore[arg-type]
                self.stats.checkins += 1
            elif kind == KIND_ERASE:
                self.erase(part, who)
            elif kind == KIND_LIST:  # this partition's part of the worker's list (the bridge merges)
                if reply_to:
                    assert self.jsio is not None
                    self.jsio.publish_core(reply_to, replies.answer(part.dispatcher, who, payload, topic=self.topics.acks(who)).encode())
            else:
                self.rejections.record("cluster", "unknown_kind", user=None)
        except ValueError as exc:  # an id a topic cannot carry: the bridge checks it, so not expected
            self.rejections.record(kind, "bad_id" if isinstance(exc, ParseError) else "malformed", user=None)
        except ClusterError:
            raise  # NATS away: the loop waits and goes on (an erasure's snapshot is retried, see erase)
        except StresswatchError as exc:  # a reply the broker did not take: what was recorded stays recorded
            log.warning("partition %d: %s request: %s", part.number, kind, exc)

    def _ack(self, part: Partition, ctx: _Context, worker: str, payload: bytes) -> None:
        """As the single engine answers (:func:`handlers.on_ack`). An alert a tick would raise
        (its window closed by the clock, not by data) may not be raised yet on a replay: the
        partition is advanced to now first, as the next tick would."""
        alert_id = _ack_alert_id(payload)
        if alert_id is not None and part.outbox.get(alert_id) is None:
            out = part.pipeline.advance(self.clock(), self.settings.engine.grace_s)
            self._windows_out(part.number, out.windows)
        handlers.on_ack(ctx, worker, payload, self.topics.acks(worker))  # type: ignore[arg-type]
        self.stats.acks += 1

    def erase(self, part: Partition, user: str) -> None:
        """The user's erasure in their partition: out of the detector and the outbox (and its
        file's free pages), a snapshot written at once without them, the partition's stream
        purged through that snapshot's sequence; then the user's retained status topic is
        cleared, which is the confirmation the single engine gives."""
        part.buffer.drop_user(user)
        part.pipeline.forget(user)
        removed = part.outbox.erase(user, self.clock())
        self.consent.forget(user)
        _scrub(part.db_path)
        part.erased.append(user)  # confirmed once the snapshot without them is saved
        log.info("partition %d: a user erased (%d alert row(s)); snapshot and purge follow", part.number, removed)
        try:
            self.snapshot(part.number, erased=True)
        except ClusterError as exc:  # NATS away: the next snapshot round saves, purges and confirms
            log.warning("partition %d: snapshot after an erasure failed (%s); retried with the next", part.number, exc)

    def _status_of(self, part: Partition, user: str, *, force: bool = False) -> None:
        now = self.clock()
        if user in part.quarantine:
            self.status.update(user, "quarantined", now, reason=part.quarantine.reason(user), force=force)
            return
        st = self.consent.state(user)
        self.status.update(user, user_status(st, now, part.pipeline.detector.baseline_ready(user)), now, force=force)

    def _publish_status(self, topic: str, body: bytes) -> None:
        if self.transport is not None:
            try:
                self.transport.inner.publish(topic, body, qos=1, retain=True)
            except StresswatchError as exc:
                log.warning("status topic not published: %s", exc)

    def tick(self) -> None:
        now = self.clock()
        for part in list(self.parts.values()):
            out = part.pipeline.advance(now, self.settings.engine.grace_s)
            self._windows_out(part.number, out.windows)
            if part.applied_seq >= part.replay_until:
                self._safely(part, part.pipeline.tick)
        self._sweep(now)

    def _sweep(self, now: datetime, most: int = 2_000) -> None:
        """What only time changes (a consent that expires): a slice of the owned partitions'
        users per tick is forgotten if consent no longer allows processing, and their status
        published if it changed (as the single engine's status sweep)."""
        users = [(part, u) for part in self.parts.values() for u in part.pipeline.detector.users]
        if not users:
            return
        start = self._sweep_at % len(users)
        self._sweep_at = start + most
        for part, user in (users[start:] + users[:start])[:most]:
            if not self.consent.may_process(user, now):
                part.buffer.drop_user(user)
                part.pipeline.forget(user)
            self._status_of(part, user)

    def _safely(self, part: Partition, job: Callable[[], object]) -> None:
        try:
            job()
        except StresswatchError as exc:
            log.warning("partition %d: %s", part.number, exc)

    # -- snapshots ---------------------------------------------------------------------
    def snapshot(self, p: int, *, erased: bool = False) -> None:
        """Save partition ``p`` (after checking the lease is still this engine's), then trim
        its ingest below the previous snapshot (one interval kept, as the ingest log does).
        ``erased``: a user was just erased: the outbox image is rebuilt without free pages and
        the stream is purged through this snapshot's sequence, at once."""
        part = self.parts.get(p)
        jsio = self.jsio
        if part is None or jsio is None:
            return
        self._flush(part)
        part.dispatcher.collect_acks()
        now_s = self.wall()
        until = now_s + self.settings.cluster.lease_ttl_s
        rev = jsio.cas(self.layout.leases, self.layout.lease_key(p), Lease(self.engine_id, until).encode(), part.lease_rev)
        if rev is None:
            log.warning("partition %d: lease lost before its snapshot; dropped", p)
            self._drop(p)
            return
        part.lease_rev, part.lease_until_s = rev, until
        if self.publish_windows:
            jsio.wait_published()  # windows published before the snapshot are in their stream
        snap = Snapshot(
            p, part.applied_seq, now_s, self.engine_id, part.pipeline.detector.to_bytes(), _sqlite_image(part.db_path, vacuum=erased or bool(part.erased)),
            part.dedup.to_state(), self.consent.revision,
        )  # fmt: skip
        jsio.put_object(self.layout.snapshot_name(p), snap.encode())
        jsio.put(self.layout.state, f"snap.{p}", json.dumps(snap.summary()).encode())
        if erased or part.erased:
            jsio.purge_through(p, snap.seq)
            part.previous_snapshot_seq = part.snapshot_seq = snap.seq
            for user in part.erased:  # the single engine's confirmation: the status topic cleared
                self.status.clear(user)
                self.stats.erasures += 1
            part.erased.clear()
        else:
            if part.previous_snapshot_seq:
                jsio.purge_before(p, part.previous_snapshot_seq + 1)
            part.previous_snapshot_seq, part.snapshot_seq = part.snapshot_seq, snap.seq
        self.stats.snapshots += 1


def _sqlite_image(path: Path, *, vacuum: bool = False) -> bytes:
    """A consistent copy of the SQLite database at ``path`` (its own connection, read-only);
    ``vacuum``: rebuilt first, so no deleted row survives in a free page."""
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    dst = sqlite3.connect(":memory:")
    try:
        src.backup(dst)
        if vacuum:
            dst.execute("VACUUM")
        return dst.serialize()
    finally:
        src.close()
        dst.close()


def _scrub(path: Path) -> None:
    """Rebuild the partition's outbox file after an erasure: deleted rows must not survive in
    free pages or in the write-ahead log."""
    try:
        db = sqlite3.connect(path)
        try:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
    except sqlite3.Error as exc:
        log.warning("outbox not rebuilt after an erasure (%s); the snapshot image is", type(exc).__name__)


def _ack_alert_id(payload: bytes) -> str | None:
    try:
        value = json.loads(payload).get("alert_id")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


__all__ = ["ClusterEngine", "ClusterStats", "ConsentView", "MarkedTransport", "Partition", "PartitionTransport"]
