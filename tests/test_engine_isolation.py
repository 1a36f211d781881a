"""A fault in one user's data path is caught at that user's boundary: the user is quarantined
(the reason on their status topic), everyone else goes on, and no stored state can make the
engine crash at every start. Real Mosquitto, the real engine."""

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

from stresswatch.alerts import MqttTransport, WorkerClient
from stresswatch.alerts.lifecycle import Sent, apply
from stresswatch.alerts.outbox import Outbox
from stresswatch.consent import ConsentLedger
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


def test_a_batch_the_engine_cannot_read_quarantines_only_its_user(mosquitto, tmp_path, rr_stream):
    """Hole 3 of the issue: one 185-byte batch with a time outside int64 stopped the engine,
    and the batches of the others, already acknowledged, were lost."""
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
        body = json.loads(retained(mosquitto.port, TOPICS.status("mallory")) or b"{}")
        assert body.get("status") == "quarantined" and "reading an ingest batch" in body.get("reason", "")
        assert json.loads(retained(mosquitto.port, TOPICS.status("alice")))["status"] == "active"
    finally:
        eng.request_stop()
        th.join(60)
    assert not th.is_alive()
    assert SampleStore(state).users() == ["alice", "bob"]
