"""A user (or worker) who publishes anything they may on their own topics cannot stop the engine
or anyone else's alerts: `stresswatch engine` as its own process, the broker from `stresswatch
broker config` with real accounts, the attacker with their own account. Regression tests for
holes 1-3 of the robustness issue, the broker's size limit, the rejection log under a flood,
and a hypothesis property test over arbitrary and adversarial payloads, retained and not."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.alerts import Topics, WorkerClient
from stresswatch.broker import private_client_id
from stresswatch.cli import main
from stresswatch.config import AlertSettings, DetectorSettings, EngineSettings, MqttSettings, Settings, StoreSettings
from stresswatch.consent import ConsentLedger
from stresswatch.engine import Engine
from stresswatch.wire.consent import encode_consent
from stresswatch.wire.ingest import IngestBatch
from stresswatch.wire.limits import MAX_BATCH_SAMPLES, MAX_INGEST_BYTES, MAX_PAYLOAD_BYTES

from conftest import FAST_DETECTOR, wait_for
from test_broker_with_engine import as_user, retained_as

TOPICS = Topics()
ENGINE = "stresswatch-engine"
CALM_S = 6 * 60  # rr_stream: 6 calm windows, then 8 windows per alert cycle
CYCLE_S = 8 * 60


# -- helpers --------------------------------------------------------------------------------------
def publish_raw(b, account: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
    t = as_user(b, account)
    try:
        t.publish(topic, payload, qos=1, retain=retain)
        t.flush(timeout_s=10)
    finally:
        t.close()


def grant(b, user: str, tmp_path: Path, recipients=("sam",)) -> None:
    with ConsentLedger(tmp_path / f"companion-{user}.sqlite") as companion:
        companion.grant(user, list(recipients), now=datetime.now(timezone.utc))
        publish_raw(b, user, TOPICS.consent(user), encode_consent(user, companion.events(user)), retain=True)


def publish_frame(b, user: str, frame: pl.DataFrame) -> None:
    t = as_user(b, user)
    stream_id = uuid.uuid4().hex
    try:
        for seq, (_, part) in enumerate(frame.group_by(pl.col("time").dt.epoch("s") // 240, maintain_order=True)):
            t.publish(TOPICS.ingest(user), IngestBatch.from_frame(part, user=user, stream_id=stream_id, seq=seq, source="synthetic").encode(), qos=1)
        t.flush(timeout_s=20)
    finally:
        t.close()


class Stream:
    """Alice's data, released one alert cycle at a time: each release raises exactly one alert."""

    def __init__(self, b, rr_stream, user: str = "alice", cycles: int = 12, seed: int = 1) -> None:
        self.b, self.user = b, user
        self.start_s = int(time.time()) // 60 * 60 - 3 * 3600
        self.frame = rr_stream(user, self.start_s, cycles, seed=seed)
        self.released = 0

    def release_next(self) -> None:
        lo = self.start_s if self.released == 0 else self.start_s + CALM_S + CYCLE_S * self.released
        hi = self.start_s + CALM_S + CYCLE_S * (self.released + 1)
        t = pl.col("time").dt.epoch("s")
        publish_frame(self.b, self.user, self.frame.filter((t >= lo) & (t < hi)))
        self.released += 1


class EngineProcess:
    """`stresswatch engine --config F` with the engine's own account; stderr kept in a file."""

    def __init__(self, b, tmp_path: Path) -> None:
        self.b = b
        self.state = tmp_path / "engine"
        self.config = tmp_path / "engine.toml"
        self.stderr = tmp_path / "engine.stderr"
        det = "\n".join(f"{k} = {v}" for k, v in FAST_DETECTOR.items())
        self.config.write_text(
            f'[mqtt]\nurl = "{b.url}"\nusername = "{ENGINE}"\npassword = "{b.passwords[ENGINE]}"\nclient_id = "{ENGINE}"\n'
            f'[store]\nstate_dir = "{self.state}"\n[detector]\n{det}\n'
            "[alerts]\ncooldown_s = 0\nescalate_after_s = 3600\nresend_after_s = 2.0\n"
            "[engine]\ntick_s = 0.2\npersist_s = 0.5\ngrace_s = 0\n"
        )
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def online(self) -> bool:
        body = retained_as(self.b, "sam", TOPICS.engine_status, timeout_s=1.0)
        return body is not None and b'"online"' in body

    def start(self) -> None:
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stresswatch.cli", "engine", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        self.starts += 1
        assert wait_for(lambda: self.alive() and self.online(), 40), self.log()[-2000:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(40)
        assert wait_for(lambda: not self.online(), 10)
        return code

    def restart(self) -> None:
        assert self.stop() == 0, self.log()[-2000:]
        self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


@pytest.fixture
def world(make_secure_broker, tmp_path, rr_stream):
    """The generated broker, the engine process, sam watching, alice consented to sam."""
    b = make_secure_broker()
    eng = EngineProcess(b, tmp_path)
    grant(b, "alice", tmp_path)
    sam_pw = b.passwords["sam"]
    sam = WorkerClient(
        b.url, "sam", lambda a: None, username="sam", password=sam_pw,
        client_id=private_client_id("stresswatch-worker-sam", sam_pw), seen_path=tmp_path / "sam-seen.sqlite",
    )  # fmt: skip
    alice = Stream(b, rr_stream)
    eng.start()
    try:
        yield b, eng, sam, alice
    finally:
        eng.kill()
        sam.close()


def alerts_still_flow(eng: EngineProcess, sam: WorkerClient, alice: Stream) -> None:
    """The property every test here ends with: another user's next cycle raises its alert."""
    before = len(sam.received)
    alice.release_next()
    assert wait_for(lambda: len(sam.received) > before, 30), f"no alert for alice; engine alive={eng.alive()}\n{eng.log()[-3000:]}"
    assert eng.alive(), eng.log()[-3000:]


def consent_doc(user: str, **event) -> bytes:
    ev = {"event_id": str(uuid.uuid4()), "action": "grant", "at": datetime.now(timezone.utc).isoformat(), "via": "cli",
          "text_version": "2026-11-2", "recipients": ["sam"], **event}  # fmt: skip
    return json.dumps({"schema_version": 1, "user": user, "events": [ev]}).encode()


def batch_doc(user: str, **fields) -> bytes:
    now_ns = time.time_ns() - 3600 * 10**9
    doc = {"schema_version": 1, "user": user, "stream_id": uuid.uuid4().hex, "seq": 0, "source": "x",
           "time_ns": [now_ns], "metric": ["rr_ms"], "value": [800.0], **fields}  # fmt: skip
    return json.dumps(doc).encode()


# -- regression tests for holes 1-3 ---------------------------------------------------------------
def test_hole1_retained_consent_with_extreme_times_does_not_stop_the_engine_across_restarts(world):
    b, eng, sam, alice = world
    publish_raw(b, "bob", TOPICS.consent("bob"), consent_doc("bob", at="9999-12-31T23:59:59-14:00"))
    publish_raw(b, "bob", TOPICS.consent("bob"), consent_doc("bob", expires_at="0001-01-01T00:00:00+14:00"), retain=True)
    alerts_still_flow(eng, sam, alice)
    for _ in range(3):  # retained: delivered again at every start
        eng.restart()
        alerts_still_flow(eng, sam, alice)
    assert "OverflowError" not in eng.log() and "Traceback" not in eng.log()
    assert "refused a consent message from user 'bob' (time_range)" in eng.log()


def test_hole2_consent_recipients_outside_the_id_grammar_are_refused_and_the_engine_stays_up(world, rr_stream):
    b, eng, sam, alice = world
    alerts_still_flow(eng, sam, alice)  # alice calibrated and alerting
    for recipient in ("#", "kim/x", ""):
        publish_raw(b, "bob", TOPICS.consent("bob"), consent_doc("bob", recipients=["sam", recipient]), retain=True)
    # bob's own stream would raise an alert to those recipients, had the grant been stored
    bob = Stream(b, rr_stream, user="bob", seed=2)
    bob.release_next()
    bob.release_next()
    alerts_still_flow(eng, sam, alice)
    eng.restart()
    alerts_still_flow(eng, sam, alice)
    with ConsentLedger(eng.state / "stresswatch.sqlite") as ledger:
        assert ledger.events("bob") == []
    assert eng.log().count("refused a consent message from user 'bob' (bad_id)") >= 1


def test_hole3_an_ingest_time_just_outside_int64_is_refused_and_other_users_still_alert(world, tmp_path):
    b, eng, sam, alice = world
    grant(b, "bob", tmp_path)  # bob's batches are processed: his consent allows it
    time.sleep(0.5)
    publish_raw(b, "bob", TOPICS.ingest("bob"), batch_doc("bob", time_ns=[9223372036854775813]))
    publish_raw(b, "bob", TOPICS.ingest("bob"), batch_doc("bob", time_ns=[-(2**63) - 5]), retain=True)
    alerts_still_flow(eng, sam, alice)
    alerts_still_flow(eng, sam, alice)
    eng.restart()
    alerts_still_flow(eng, sam, alice)
    assert "Traceback" not in eng.log()
    assert "refused a ingest message from user 'bob' (time_range)" in eng.log()


def test_non_finite_values_are_refused_so_export_writes_valid_json(world, tmp_path):
    b, eng, sam, alice = world
    grant(b, "bob", tmp_path)
    time.sleep(0.5)
    for token in ("NaN", "Infinity", "-Infinity"):
        publish_raw(b, "bob", TOPICS.ingest("bob"), batch_doc("bob").replace(b"800.0", token.encode()))
    publish_raw(b, "bob", TOPICS.ingest("bob"), batch_doc("bob", value=[801.5]))
    alerts_still_flow(eng, sam, alice)
    assert eng.stop() == 0
    out = tmp_path / "bob-export.json"
    assert main(["--set", f"store.state_dir={eng.state}", "export", "--user", "bob", "--out", str(out)]) == 0

    def strict(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    doc = json.loads(out.read_text(), parse_constant=strict)
    assert "801.5" in out.read_text() and doc


# -- the broker's size limit ------------------------------------------------------------------
def test_the_generated_broker_refuses_a_publish_over_the_largest_legitimate_message(make_secure_broker):
    b = make_secure_broker()
    # the largest legitimate ingest batch fits under the limit (worst-case value reprs, 19-digit times)
    t0 = time.time_ns()
    biggest = IngestBatch(user="alice", stream_id="s" * 64, seq=2**64 - 1, source="x" * 256,
                          time_ns=[t0 + i for i in range(MAX_BATCH_SAMPLES)], metric=["motion"] * MAX_BATCH_SAMPLES,
                          value=[-123456.78901234567] * MAX_BATCH_SAMPLES).encode()  # fmt: skip
    assert len(biggest) <= MAX_INGEST_BYTES <= MAX_PAYLOAD_BYTES
    results: dict[int, int] = {}
    done = threading.Event()

    def on_publish(c, u, mid, rc, props=None):
        results[mid] = rc.value if hasattr(rc, "value") else int(rc)
        done.set()

    dropped = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice-size", protocol=mqtt.MQTTv5)
    c.username_pw_set("alice", b.passwords["alice"])
    c.on_publish = on_publish
    c.on_disconnect = lambda *a: dropped.set()
    c.connect("127.0.0.1", b.port)
    c.loop_start()
    try:
        topic = TOPICS.consent("alice")
        ok = c.publish(topic, biggest, qos=1, retain=True)
        assert wait_for(lambda: ok.mid in results, 20) and results[ok.mid] < 0x80  # 0x10: accepted, no subscriber
        assert len(retained_as(b, ENGINE, topic, timeout_s=5) or b"") == len(biggest)
        too_big = c.publish(topic, b"x" * (MAX_PAYLOAD_BYTES + 1), qos=1, retain=True)
        # refused: PUBACK 0x95 "packet too large", and mosquitto 2.0 drops the connection
        assert wait_for(lambda: results.get(too_big.mid, 0) >= 0x80 or dropped.is_set(), 20)
    finally:
        c.disconnect()
        c.loop_stop()
    assert len(retained_as(b, ENGINE, topic, timeout_s=5) or b"") == len(biggest)  # neither stored nor forwarded


# -- a flood: bounded log, exact counter --------------------------------------------------------
def test_a_flood_of_bad_messages_yields_a_bounded_log_and_an_exact_counter(make_secure_broker, tmp_path, caplog):
    b = make_secure_broker()
    settings = Settings(
        mqtt=MqttSettings(url=b.url, username=ENGINE, password=b.passwords[ENGINE], client_id=ENGINE),
        detector=DetectorSettings(**FAST_DETECTOR),
        store=StoreSettings(state_dir=tmp_path / "engine"),
        alerts=AlertSettings(cooldown_s=0, escalate_after_s=3600),
        engine=EngineSettings(tick_s=0.2, persist_s=0.5, grace_s=0),
    )
    eng = Engine(settings, url=b.url)
    th = threading.Thread(target=eng.run, daemon=True)
    n = 10_000
    with caplog.at_level(logging.WARNING):
        th.start()
        try:
            assert eng.ready.wait(20)
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bob-flood", protocol=mqtt.MQTTv5)
            c.username_pw_set("bob", b.passwords["bob"])
            c.connect("127.0.0.1", b.port)
            c.loop_start()
            kinds = [
                b"\xffSW garbage",  # malformed
                batch_doc("bob").replace(b"800.0", b"NaN"),  # value_range
                batch_doc("bob", time_ns=[9223372036854775813]),  # time_range
                batch_doc("alice"),  # wrong_user
            ]
            started = time.monotonic()
            for i in range(n):
                c.publish(TOPICS.ingest("bob"), kinds[i % len(kinds)], qos=0)
            assert wait_for(lambda: eng.rejections.total == n, 120), eng.rejections.counts()
            elapsed_s = time.monotonic() - started
            c.loop_stop()
            c.disconnect()
        finally:
            eng.request_stop()
            th.join(30)
    lines = [r.getMessage() for r in caplog.records if "ingest message" in r.getMessage()]
    assert sum(eng.rejections.counts().values()) == n
    reasons = eng.rejections.counts()
    assert set(reasons) == {("ingest", r) for r in ("malformed", "value_range", "time_range", "wrong_user")}
    # per reason: the first at once, one a minute with the count of those not logged, the rest at shutdown
    assert len(reasons) <= len(lines) <= len(reasons) * (2 + int(elapsed_s // 60)), lines
    assert all("NaN" not in line and "garbage" not in line for line in lines)


# -- the hostile-client property test -------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=15,
)
extreme_times = st.sampled_from(["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-11-25T10:00:00", "1999-01-01T00:00:00Z"])
bad_ids = st.sampled_from(["#", "kim/x", "", "+", "a" * 300, "sam\u0000", "bob"])
ints = st.one_of(st.sampled_from([9223372036854775813, -(2**63) - 5, 2**63 - 1, 0, 2**70]), st.integers())
floats = st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), 1e308, -1.0, 70_000.0]))

ingest_payloads = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=120).map(lambda x: b"\xffSW\x01" + x),
    json_values.map(lambda d: json.dumps(d).encode()),
    st.builds(lambda t, v: batch_doc("bob", time_ns=[t], value=[v]), ints, floats),
    st.builds(lambda u: batch_doc(u), bad_ids),
    st.builds(lambda s: batch_doc("bob", seq=s), ints),
)
consent_payloads = st.one_of(
    st.binary(max_size=200),
    st.just(b""),  # erasure of bob's own data: allowed, and must not disturb anyone else
    json_values.map(lambda d: json.dumps(d).encode()),
    st.builds(lambda at: consent_doc("bob", at=at), extreme_times),
    st.builds(lambda at: consent_doc("bob", expires_at=at), extreme_times),
    st.builds(lambda r: consent_doc("bob", recipients=[r]), bad_ids),
    st.builds(lambda u: consent_doc(u), bad_ids),
)
ack_payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda d: json.dumps(d).encode()),
    st.builds(lambda a: json.dumps({"alert_id": a, "action": "ack"}).encode(), bad_ids),
    st.just(json.dumps({"alert_id": str(uuid.uuid4()), "action": "resolve", "outcome": "reached_out", "note": "x" * 600}).encode()),
    st.just(json.dumps({"alert_id": str(uuid.uuid4()), "action": "ack"}).encode()),  # valid, but no such alert
)
hostile = st.lists(
    st.one_of(
        st.tuples(st.just(("bob", "ingest")), ingest_payloads, st.booleans()),
        st.tuples(st.just(("bob", "consent")), consent_payloads, st.booleans()),
        st.tuples(st.just(("kim", "acks")), ack_payloads, st.booleans()),
    ),
    min_size=1,
    max_size=4,
)


def test_hostile_clients_cannot_stop_the_engine_or_another_users_alerts(world, tmp_path):
    b, eng, sam, alice = world
    grant(b, "bob", tmp_path)  # bob's data is processed: his messages reach every stage
    alerts_still_flow(eng, sam, alice)

    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(messages=hostile)
    def one_round(messages):
        for (account, kind), payload, retain in messages:
            topic = f"{TOPICS.prefix}/{kind}/{account}"
            publish_raw(b, account, topic, payload, retain=retain)
        alerts_still_flow(eng, sam, alice)
        eng.restart()  # whatever is retained is delivered again at start

    one_round()
    assert "Traceback" not in eng.log(), eng.log()[-3000:]
