"""The product's own clients through the generated broker, each with its own account: the
ACL fits the real code paths (engine, companion consent and ingest, worker watch and ack)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone

import polars as pl

from stresswatch.alerts import Topics, WorkerClient
from stresswatch.alerts.lifecycle import AlertState
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.transport import MqttTransport, connect
from stresswatch.broker import private_client_id
from stresswatch.config import AlertSettings, DetectorSettings, EngineSettings, MqttSettings, Settings, StoreSettings
from stresswatch.consent import ConsentLedger
from stresswatch.wire.consent import encode_consent
from stresswatch.engine import Engine
from stresswatch.ingest import IngestBatch

from conftest import FAST_DETECTOR, wait_for

TOPICS = Topics()
ENGINE = "stresswatch-engine"



def as_user(b, user: str) -> MqttTransport:
    return MqttTransport(b.url, client_id=f"companion-{user}-{uuid.uuid4().hex[:6]}", username=user, password=b.passwords[user])


def retained_as(b, account: str, topic: str, timeout_s: float = 3.0) -> bytes | None:
    got: list[bytes] = []
    ev = threading.Event()

    def on_message(c, u, m):
        got.append(m.payload)
        ev.set()

    c = connect(b.url, f"peek-{uuid.uuid4().hex[:6]}", username=account, password=b.passwords[account], on_message=on_message)
    c.subscribe(topic, qos=1)
    ev.wait(timeout_s)
    c.disconnect()
    c.loop_stop()
    return got[0] if got else None


def test_engine_companion_and_worker_work_through_the_generated_broker_with_their_own_accounts(
    secure_broker, tmp_path, rr_stream
):
    b = secure_broker
    state = tmp_path / "engine"
    settings = Settings(
        mqtt=MqttSettings(url=b.url, username=ENGINE, password=b.passwords[ENGINE], client_id=private_client_id(ENGINE, b.passwords[ENGINE])),
        detector=DetectorSettings(**FAST_DETECTOR),
        store=StoreSettings(state_dir=state),
        alerts=AlertSettings(cooldown_s=0, escalate_after_s=3600),
        engine=EngineSettings(tick_s=0.2, persist_s=0.5, grace_s=0),
    )
    # the companion: consent with alice's own account, retained on her topic
    with ConsentLedger(tmp_path / "alice.sqlite") as companion:
        companion.grant("alice", now=datetime.now(timezone.utc), recipients=["sam"])
        t = as_user(b, "alice")
        t.publish(TOPICS.consent("alice"), encode_consent("alice", companion.events("alice")), qos=1, retain=True)
        t.close()
    sam_pw = b.passwords["sam"]
    sam = WorkerClient(
        b.url, "sam", lambda a: None, username="sam", password=sam_pw,
        client_id=private_client_id("stresswatch-worker-sam", sam_pw), seen_path=tmp_path / "sam-seen.sqlite",
    )  # fmt: skip
    eng = Engine(settings, url=b.url)
    th = threading.Thread(target=eng.run, daemon=True)
    th.start()
    try:
        assert eng.ready.wait(20)
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        frame = rr_stream("alice", start_s, 2, seed=1)
        t = as_user(b, "alice")
        stream_id = uuid.uuid4().hex
        for seq, (_, part) in enumerate(frame.group_by(pl.col("time").dt.epoch("s") // 240, maintain_order=True)):
            t.publish(TOPICS.ingest("alice"), IngestBatch.from_frame(part, user="alice", stream_id=stream_id, seq=seq, source="synthetic").encode(), qos=1)
        t.close()
        assert wait_for(lambda: len(sam.received) == 2, timeout=20.0), sam.received
        sam.ack(sam.received[0].alert_id)
        with Outbox(state / "stresswatch.sqlite") as ob:
            assert wait_for(lambda: ob.get(sam.received[0].alert_id).state is AlertState.ACKNOWLEDGED, timeout=20.0)
        # alice reads her own status and the engine's; bob reads neither of hers
        assert json.loads(retained_as(b, "alice", TOPICS.status("alice")) or b"{}").get("status") == "active"
        assert json.loads(retained_as(b, "sam", TOPICS.engine_status) or b"{}").get("status") == "online"
        assert retained_as(b, "bob", TOPICS.status("alice"), timeout_s=1.0) is None
    finally:
        eng.request_stop()
        th.join(20)
        sam.close()
    assert not th.is_alive()
