"""The shipped broker configuration: `stresswatch broker config` writes an alerts-and-consent
broker (store saved after every change) and an ingest broker (saved every minute), both run
as real Mosquitto processes here. The engine works across the two, and a SIGKILL of the ingest
broker loses no batch a companion was told is safe: the companion forgets a batch only on the
engine's confirmation, which comes after the batch is in the engine's ingest log."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone

import polars as pl
import pytest

from stresswatch.alerts import Topics, WorkerClient
from stresswatch.alerts.transport import MqttTransport
from stresswatch.broker import private_client_id
from stresswatch.config import AlertSettings, DetectorSettings, EngineSettings, MqttSettings, Settings, StoreSettings
from stresswatch.consent import ConsentLedger
from stresswatch.engine import Engine
from stresswatch.ingest import IngestBatch
from stresswatch.mqtt import connect
from stresswatch.wire.consent import encode_consent
from stresswatch_adapters.ble_hrs.buffer import StreamBuffer
from stresswatch_adapters.ble_hrs.stream import DurablePublisher

from conftest import FAST_DETECTOR, wait_for

pytestmark = pytest.mark.mosquitto
TOPICS = Topics()
ENGINE = "stresswatch-engine"


def engine_settings(b, state, reader: str = "paho") -> Settings:
    pw = b.passwords[ENGINE]
    return Settings(
        mqtt=MqttSettings(url=b.url, ingest_url=b.ingest_url, ingest_reader=reader, username=ENGINE, password=pw, client_id=private_client_id(ENGINE, pw)),
        detector=DetectorSettings(**FAST_DETECTOR),
        store=StoreSettings(state_dir=state),
        alerts=AlertSettings(cooldown_s=0, escalate_after_s=3600),
        engine=EngineSettings(tick_s=0.2, persist_s=0.5, grace_s=0),
    )


def grant(b, tmp_path, user: str) -> None:
    """The companion's consent, retained on the alerts-and-consent broker with the user's account."""
    with ConsentLedger(tmp_path / f"{user}.sqlite") as ledger:
        ledger.grant(user, now=datetime.now(timezone.utc), recipients=["sam"])
        t = MqttTransport(b.url, client_id=f"companion-{user}-{uuid.uuid4().hex[:6]}", username=user, password=b.passwords[user])
        t.publish(TOPICS.consent(user), encode_consent(user, ledger.events(user)), qos=1, retain=True)
        t.close()


def status_of(b, user: str, timeout_s: float = 1.0) -> bytes | None:
    """The user's retained status, which the engine keeps on the ingest broker."""
    got: list[bytes] = []
    ev = threading.Event()

    def on_message(c, u, m):
        got.append(m.payload)
        ev.set()

    c = connect(b.ingest_url, f"peek-{uuid.uuid4().hex[:6]}", username=user, password=b.passwords[user], on_message=on_message)
    c.subscribe(TOPICS.status(user), qos=1)
    ev.wait(timeout_s)
    c.disconnect()
    c.loop_stop()
    return got[0] if got else None


def buffered(tmp_path, user: str, frame: pl.DataFrame, chunk_s: int) -> tuple[StreamBuffer, int]:
    """The companion's durable buffer holding the frame as batches of ``chunk_s`` seconds."""
    box = StreamBuffer(tmp_path / f"{user}-buffer.sqlite")
    stream_id = uuid.uuid4().hex
    parts = frame.group_by(pl.col("time").dt.epoch("s") // chunk_s, maintain_order=True)
    n = 0
    for seq, (_, part) in enumerate(parts):
        box.add(stream_id, seq, TOPICS.ingest(user), IngestBatch.from_frame(part, user=user, stream_id=stream_id, seq=seq, source="synthetic").encode_binary(), part.height)
        n += 1
    return box, n


def run_engine(settings: Settings, url: str):
    eng = Engine(settings, url=url)
    th = threading.Thread(target=eng.run, daemon=True)
    th.start()
    assert eng.ready.wait(30)
    return eng, th


def stop_engine(eng, th) -> None:
    eng.request_stop()
    th.join(30)
    assert not th.is_alive()


def test_broker_config_writes_two_brokers_that_start_and_share_the_accounts(make_secure_broker):
    b = make_secure_broker(ingest=True)
    alerts, ingest = b.dir / "mosquitto.conf", b.dir / "mosquitto-ingest.conf"
    a_text, i_text = alerts.read_text(), ingest.read_text()
    assert "autosave_on_changes true\nautosave_interval 1\n" in a_text
    assert "autosave_on_changes false\nautosave_interval 60\n" in i_text and "persistence true" in i_text
    for text in (a_text, i_text):  # one password file and one ACL for both
        assert f"password_file {b.dir.resolve()}/passwd" in text and f"acl_file {b.dir.resolve()}/acl" in text
        assert "allow_anonymous false" in text
    assert f"persistence_location {b.dir.resolve()}/data-ingest/" in i_text
    # both real brokers take the same account, and refuse a wrong password
    for url in (b.url, b.ingest_url):
        c = connect(url, f"probe-{uuid.uuid4().hex[:6]}", username="alice", password=b.passwords["alice"])
        c.disconnect()
        c.loop_stop()
    from stresswatch.mqtt import NotAuthorised

    with pytest.raises(NotAuthorised):
        connect(b.ingest_url, "probe-wrong", username="alice", password="wrong", timeout_s=5)


@pytest.mark.parametrize("reader", ["paho", "bulk"])
def test_engine_on_two_brokers_ingest_on_one_alerts_and_consent_on_the_other(make_secure_broker, tmp_path, rr_stream, reader):
    b = make_secure_broker(ingest=True)
    grant(b, tmp_path, "alice")
    sam_pw = b.passwords["sam"]
    sam = WorkerClient(
        b.url, "sam", lambda a: None, username="sam", password=sam_pw,
        client_id=private_client_id("stresswatch-worker-sam", sam_pw), seen_path=tmp_path / "sam-seen.sqlite",
    )  # fmt: skip
    eng, th = run_engine(engine_settings(b, tmp_path / "engine", reader), b.url)
    try:
        assert wait_for(lambda: status_of(b, "alice") is not None, 20)  # consent recorded
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        box, n = buffered(tmp_path, "alice", rr_stream("alice", start_s, 2, seed=1), 60)
        pub = DurablePublisher(b.ingest_url, box, username="alice", password=b.passwords["alice"], confirm=True)
        try:
            assert pub.drain(30.0), f"{box.count()} of {n} batches not confirmed"
        finally:
            pub.close()
        assert box.count() == 0 and pub.acked == n
        assert wait_for(lambda: eng.stats().batches_processed == n, 20)
        assert wait_for(lambda: len(sam.received) == 2, 20), sam.received  # alerts on the other broker
    finally:
        stop_engine(eng, th)
        sam.close()


@pytest.mark.parametrize("reader", ["paho", "bulk"])
def test_ingest_broker_killed_mid_stream_loses_no_batch_the_engine_confirmed(make_secure_broker, tmp_path, rr_stream, reader):
    b = make_secure_broker(ingest=True)
    grant(b, tmp_path, "alice")
    eng, th = run_engine(engine_settings(b, tmp_path / "engine", reader), b.url)
    try:
        assert wait_for(lambda: status_of(b, "alice") is not None, 20)
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        box, n = buffered(tmp_path, "alice", rr_stream("alice", start_s, 3, seed=2), 5)
        pub = DurablePublisher(b.ingest_url, box, username="alice", password=b.passwords["alice"], confirm=True, window=20, reconnect_max_s=1)
        killed = False
        try:
            deadline = time.monotonic() + 90
            while box.count() and time.monotonic() < deadline:
                pub.pump()
                if not killed and pub.acked >= n // 3:
                    b.ingest.kill()  # SIGKILL mid-stream: the broker saved nothing of this stream
                    b.ingest.start()  # same directory, same port
                    killed = True
                time.sleep(0.02)
        finally:
            pub.close()
        assert killed and box.count() == 0, f"{box.count()} of {n} batches never confirmed"
        # every batch reached the engine exactly once (re-sent copies were dropped as duplicates)
        assert wait_for(lambda: eng.stats().batches_processed == n, 30), (eng.stats(), n)
        assert pub.connects >= 2
    finally:
        stop_engine(eng, th)


def test_without_confirmations_a_sigkill_of_the_ingest_broker_loses_what_it_acknowledged(make_secure_broker, tmp_path, rr_stream):
    """Why the companion waits for the engine: the ingest broker acknowledges a batch before it
    is saved (every 60 s), so a companion that forgot batches on the PUBACK loses them here."""
    b = make_secure_broker(ingest=True)
    got: list[bytes] = []
    cid = f"engine-like-{uuid.uuid4().hex[:6]}"
    sub = connect(b.ingest_url, cid, username=ENGINE, password=b.passwords[ENGINE], persistent_session=True)
    sub.subscribe(f"{TOPICS.prefix}/ingest/+", qos=1)
    time.sleep(0.5)
    sub.disconnect()  # offline: the broker queues for the session
    sub.loop_stop()
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    box, n = buffered(tmp_path, "alice", rr_stream("alice", start_s, 0), 30)
    pub = DurablePublisher(b.ingest_url, box, username="alice", password=b.passwords["alice"], confirm=False)
    try:
        assert pub.drain(20.0) and box.count() == 0  # all acknowledged by the broker, all forgotten
    finally:
        pub.close()
    b.ingest.kill()
    b.ingest.start()
    sub = connect(b.ingest_url, cid, username=ENGINE, password=b.passwords[ENGINE], persistent_session=True, on_message=lambda c, u, m: got.append(m.payload))
    sub.subscribe(f"{TOPICS.prefix}/ingest/+", qos=1)
    time.sleep(2.0)
    sub.disconnect()
    sub.loop_stop()
    assert n > 0 and got == []
