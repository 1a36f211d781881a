"""A fault in one user's data path is caught at that user's boundary: the user is quarantined
(the reason on their status topic), everyone else goes on, and no stored state can make the
engine crash at every start. Real Mosquitto, the real engine."""

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import polars as pl

from stresswatch.alerts import MemoryTransport, MqttTransport, WorkerClient
from stresswatch.alerts.dispatch import Dispatcher
from stresswatch.alerts.lifecycle import Sent, apply
from stresswatch.alerts.outbox import Outbox
from stresswatch.consent import ConsentLedger
from stresswatch.detect import Detector
from stresswatch.engine.isolation import detect_isolated, dispatch_isolated
from stresswatch.engine.quarantine import Quarantine
from stresswatch.pipeline import DataClock, Pipeline
from stresswatch.model import AlertDecision, AlertLevel, Reason, alert_id_for
from stresswatch.store import SampleStore

from test_engine import TOPICS, publish_consent, publish_stream, retained, settings_for, start_engine, wait_for
from test_engine_recovery import raised_ids


def test_a_stored_delivery_no_topic_can_carry_is_dropped_and_reported_not_a_crash_loop(mosquitto, tmp_path):
    """Hole 2 of the issue, from stored state: a pending delivery to '#' (a recipient the wire
    once let through) made pump raise at every start and in shutdown."""
    url = mosquitto.url
    state = tmp_path / "engine"
    db = state / "stresswatch.sqlite"
    now = datetime.now(timezone.utc)
    with ConsentLedger(db) as ledger:
        ledger.grant("alice", ["sam"], now=now)
    start = now - timedelta(minutes=10)
    d = AlertDecision(alert_id_for("alice", start), "alice", now, start, AlertLevel.HIGH, (Reason.HR_ABOVE_BASELINE,), 3.0)
    with Outbox(db) as ob:  # what an engine had queued before it stopped
        ob.record_raised(d, now)
        ob.save(apply(ob.get(d.alert_id), Sent(("#", "sam"), now)), "sent", now, enqueue=("#", "sam"))
    sam = WorkerClient(url, "sam", lambda a: None)
    for attempt in range(2):  # and again after a restart: nothing left that fails
        eng, th = start_engine(settings_for(url, state), url)
        try:
            if attempt == 0:
                assert wait_for(lambda: len(sam.received) == 1, 15), "the deliverable recipient must still get it"
            time.sleep(1.0)
            assert th.is_alive()
        finally:
            eng.request_stop()
            th.join(30)
        assert not th.is_alive(), "shutdown must finish"
    with Outbox(db) as ob:
        counts = ob.delivery_counts()
        assert counts["pending"] == 0 and counts["dropped"] == 1 and counts["delivered"] == 1
    sam.close()


def test_a_batch_with_a_time_outside_int64_costs_no_one_else_anything(mosquitto, tmp_path, rr_stream):
    """Hole 3 of the issue: one 185-byte batch with a time outside int64 stopped the engine,
    and the batches of the others, already acknowledged, were lost. Now the wire boundary
    refuses it, and were anything to get past it, the flush quarantines only its user."""
    url = mosquitto.url
    state = tmp_path / "engine"
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    for u in ("alice", "bob", "mallory"):
        publish_consent(url, u, tmp_path / f"{u}.sqlite", recipients=["sam"])
    eng, th = start_engine(settings_for(url, state), url)
    try:
        hostile = json.dumps(
            {"schema_version": 1, "user": "mallory", "stream_id": uuid.uuid4().hex, "seq": 0, "source": "x",
             "time_ns": [9223372036854775813], "metric": ["rr_ms"], "value": [800.0]}
        ).encode()  # fmt: skip
        t = MqttTransport(url, client_id="mallory-companion")
        t.publish(TOPICS.ingest("mallory"), hostile, qos=1)
        t.flush()
        t.close()
        publish_stream(url, rr_stream("alice", start_s, 2, seed=1))
        publish_stream(url, rr_stream("bob", start_s, 2, seed=2))
        db = state / "stresswatch.sqlite"
        assert wait_for(lambda: len({i for i in raised_ids(db)}) == 4, 30), len(raised_ids(db))
        assert th.is_alive()
        assert eng.stats().rejected + eng.stats().quarantined >= 1
        assert json.loads(retained(mosquitto.port, TOPICS.status("alice")))["status"] == "active"
    finally:
        eng.request_stop()
        th.join(60)
    assert not th.is_alive()
    assert SampleStore(state).users() == ["alice", "bob"]


class FaultyDetector(Detector):
    """A detector with a fault in one user's path (what no valid input is known to cause)."""

    def update(self, batch):
        if "mallory" in batch.get_column("user").to_list():
            raise ArithmeticError("a fault in mallory's data path")
        return super().update(batch)


def test_a_detector_fault_is_retried_user_by_user_and_only_its_user_is_set_aside(tmp_path, rr_stream):
    faults: list[tuple[str, str]] = []
    with Outbox(":memory:") as outbox, ConsentLedger(":memory:") as ledger:
        ledger.grant("alice", ["sam"], now=datetime.now(timezone.utc))
        transport = MemoryTransport()
        dispatcher = Dispatcher.from_settings(settings_for("mqtt://127.0.0.1:1", tmp_path), outbox, ledger, transport, clock=DataClock())
        pipeline = Pipeline(FaultyDetector(settings_for("mqtt://127.0.0.1:1", tmp_path).detector), dispatcher)
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        frame = pl.concat([rr_stream("alice", start_s, 2, seed=1), rr_stream("mallory", start_s, 2, seed=2)])
        outputs = detect_isolated(pipeline, frame, lambda user, step, exc: faults.append((user, step)))
        assert faults == [("mallory", "the detector")]
        assert [set(part.get_column("user")) for part, _ in outputs] == [{"alice"}]
        for _, out in outputs:
            dispatch_isolated(pipeline, out, lambda user, step, exc: faults.append((user, step)))
        assert pipeline.detector.users == ["alice"] and len(outputs[0][1].alerts) == 2
        assert len(transport.messages) == 2  # alice's alerts went out


def test_quarantine_names_the_step_and_the_fault_type_never_a_value():
    q = Quarantine()
    assert q.add("mallory", "the detector", ArithmeticError("value 1e400 at 12:00"))
    assert not q.add("mallory", "the detector", ValueError("again"))
    assert q.reason("mallory") == "the detector failed (ArithmeticError)" and "mallory" in q and len(q) == 1
