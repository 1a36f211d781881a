"""The engine service through a real Mosquitto: consent over the retained topic, ingest,
durable alert delivery, acks and resolutions recorded in the lifecycle, status topics."""

import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import paho.mqtt.client as mqtt
import pytest

from stresswatch.alerts import Topics, WorkerClient
from stresswatch.alerts.lifecycle import AlertState, Outcome
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.transport import MqttTransport
from stresswatch.config import AlertSettings, DetectorSettings, EngineSettings, MqttSettings, Settings, StoreSettings
from stresswatch.consent import ConsentLedger
from stresswatch.wire.consent import encode_consent
from stresswatch.engine import Engine
from stresswatch.ingest import IngestBatch
from stresswatch.store import SampleStore

from conftest import FAST_DETECTOR, wait_for

TOPICS = Topics()



def settings_for(url: str, state_dir, **alerts) -> Settings:
    return Settings(
        mqtt=MqttSettings(url=url),
        detector=DetectorSettings(**FAST_DETECTOR),
        store=StoreSettings(state_dir=state_dir),
        alerts=AlertSettings(**{"cooldown_s": 0, "escalate_after_s": 3600, **alerts}),
        engine=EngineSettings(tick_s=0.2, persist_s=0.5, grace_s=0),
    )


def publish_consent(url: str, user: str, ledger_path, **grant) -> None:
    """What `stresswatch consent grant` does: a local ledger, the history sent retained."""
    with ConsentLedger(ledger_path) as companion:
        if grant:
            companion.grant(user, now=datetime.now(timezone.utc), **grant)
        else:
            companion.revoke(user, now=datetime.now(timezone.utc))
        t = MqttTransport(url, client_id=f"companion-{user}")
        t.publish(TOPICS.consent(user), encode_consent(user, companion.events(user)), qos=1, retain=True)
        t.close()


def publish_stream(url: str, frame, *, chunk_s: int = 240) -> int:
    """What a companion does: window-aligned batches on the user's ingest topic."""
    import polars as pl

    t = MqttTransport(url, client_id=f"companion-ingest-{uuid.uuid4().hex[:6]}")
    stream_id = uuid.uuid4().hex
    n = 0
    for seq, (_, part) in enumerate(frame.group_by(pl.col("time").dt.epoch("s") // chunk_s, maintain_order=True)):
        user = part.item(0, "user")
        t.publish(TOPICS.ingest(user), IngestBatch.from_frame(part, user=user, stream_id=stream_id, seq=seq, source="synthetic").encode(), qos=1)
        n += 1
    t.close()
    return n


def start_engine(settings: Settings, url: str) -> tuple[Engine, threading.Thread]:
    eng = Engine(settings, url=url)
    th = threading.Thread(target=eng.run, daemon=True)
    th.start()
    assert eng.ready.wait(20)
    return eng, th


def consent_status(state_dir, user: str) -> str:
    with ConsentLedger(state_dir / "stresswatch.sqlite") as ledger:
        return ledger.state(user).status.value


def retained(url_port: int, topic: str, timeout: float = 5.0, protocol=mqtt.MQTTv5) -> bytes | None:
    got: list[bytes] = []
    ev = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)

    def on_message(cl, u, m):
        got.append(m.payload)
        ev.set()

    c.on_message = on_message
    c.connect("127.0.0.1", url_port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    ev.wait(timeout)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


def test_engine_alerts_only_consenting_users_and_records_acks(mosquitto, tmp_path, rr_stream):
    url = mosquitto.url
    state = tmp_path / "engine"
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    publish_consent(url, "alice", tmp_path / "alice.sqlite", recipients=["sam"])
    # bob granted then revoked: the engine must neither process nor alert about him
    publish_consent(url, "bob", tmp_path / "bob.sqlite", recipients=["sam"])
    publish_consent(url, "bob", tmp_path / "bob.sqlite")
    sam = WorkerClient(url, "sam", lambda a: None, seen_path=tmp_path / "sam-seen.sqlite")
    eng, th = start_engine(settings_for(url, state), url)
    try:
        assert wait_for(lambda: consent_status(state, "bob") == "revoked", timeout=15.0)
        publish_stream(url, rr_stream("alice", start_s, 3, seed=1))
        publish_stream(url, rr_stream("bob", start_s, 3, seed=2))
        assert wait_for(lambda: len(sam.received) == 3, timeout=15.0), sam.received
        time.sleep(1.0)
        assert len(sam.received) == 3 and sam.duplicates == 0
        assert eng.dropped_batches > 0  # bob's batches, dropped unprocessed
        assert "bob" not in eng.pipeline.detector.users
        # a status the user can read, retained; the engine says it is online
        assert json.loads(retained(mosquitto.port, TOPICS.status("alice")))["status"] == "active"
        assert json.loads(retained(mosquitto.port, TOPICS.engine_status))["status"] == "online"

        first, second = sam.received[0].alert_id, sam.received[1].alert_id
        sam.ack(first)
        sam.resolve(first, Outcome.REACHED_OUT, note="called")
        sam.resolve(second, Outcome.NOT_NEEDED)
        other = WorkerClient(url, "mallory", lambda a: None)
        other.resolve(sam.received[2].alert_id, Outcome.NO_ANSWER)  # not hers: ignored
        other.close()
        with Outbox(state / "stresswatch.sqlite") as ob:
            assert wait_for(lambda: ob.get(second).state is AlertState.RESOLVED, timeout=15.0)
            r1 = ob.get(first)
            assert (r1.state, r1.acked_by, r1.outcome, r1.note) == (AlertState.RESOLVED, "sam", Outcome.REACHED_OUT, "called")
            assert ob.get(sam.received[2].alert_id).state is AlertState.DELIVERED
            assert {r.user for r in ob.records()} == {"alice"}
            kinds = [e["kind"] for e in ob.events("alice") if e["alert_id"] == first]
            assert kinds == ["raised", "sent", "delivered", "acknowledged", "resolved"]
    finally:
        eng.request_stop()
        th.join(60)
        sam.close()
    assert not th.is_alive()
    assert json.loads(retained(mosquitto.port, TOPICS.engine_status))["status"] == "offline"
    # samples of the consenting user were stored, the other's not
    assert SampleStore(state).users() == ["alice"]


def test_unacknowledged_alert_escalates_to_the_group_on_the_engines_scheduler(mosquitto, tmp_path, rr_stream):
    """apscheduler ticks drive escalation in the running engine (real clock, 1 s policy)."""
    url = mosquitto.url
    settings = settings_for(url, tmp_path / "engine", escalate_after_s=1, renotify_after_s=3600, max_reminders=0)
    settings = settings.model_copy(update={"groups": {"team-north": ["kim", "lee"]}})
    publish_consent(url, "alice", tmp_path / "alice.sqlite", recipients=["sam", "team-north"])
    got: dict[str, list] = {w: [] for w in ("sam", "kim", "lee", "zoe")}
    clients = [WorkerClient(url, w, got[w].append) for w in got]
    eng, th = start_engine(settings, url)
    try:
        publish_stream(url, rr_stream("alice", int(time.time()) // 60 * 60 - 3600, 1, seed=3))
        assert wait_for(lambda: len(got["sam"]) == 1, timeout=15.0)
        assert wait_for(lambda: len(got["kim"]) == 1 and len(got["lee"]) == 1, 20)
        a = got["sam"][0]
        assert got["kim"][0].alert_id == got["lee"][0].alert_id == a.alert_id
        assert (a.notice, got["kim"][0].notice) == (0, 1)
        # kim takes it: no more notices to anyone
        clients[1].ack(a.alert_id)
        with Outbox(tmp_path / "engine" / "stresswatch.sqlite") as ob:
            assert wait_for(lambda: ob.get(a.alert_id).acked_by == "kim", timeout=15.0)
            assert ob.get(a.alert_id).targets == ("sam", "kim", "lee")
        time.sleep(1.5)
        assert [len(got[w]) for w in ("sam", "kim", "lee", "zoe")] == [1, 1, 1, 0]
    finally:
        eng.request_stop()
        th.join(60)
        for c in clients:
            c.close()


def test_engine_refuses_an_unauthenticated_broker_off_loopback(tmp_path):
    import subprocess
    import sys

    env = {**__import__("os").environ, "STRESSWATCH_STORE__STATE_DIR": str(tmp_path)}
    # .invalid never resolves: nothing is sent anywhere even if the check were missing
    res = subprocess.run(
        [sys.executable, "-m", "stresswatch.cli", "engine", "--broker", "mqtt://broker.invalid:1883"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert res.returncode == 78, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "without credentials" in res.stderr


def test_worker_cli_watch_ack_resolve_round_trip(mosquitto, tmp_path, rr_stream):
    """What a support worker types: `alerts watch`, `alerts ack`, `alerts resolve`."""
    import os
    import subprocess
    import sys

    url = mosquitto.url
    env = {**os.environ, "STRESSWATCH_STORE__STATE_DIR": str(tmp_path / "worker")}

    def cli(*args, timeout=60):
        return subprocess.run([sys.executable, "-m", "stresswatch.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)

    state = tmp_path / "engine"
    publish_consent(url, "alice", tmp_path / "alice.sqlite", recipients=["sam"])
    # sam's session exists before the alert (as after any earlier watch)
    assert cli("alerts", "watch", "--worker", "sam", "--broker", url, "--timeout-s", "0.5").returncode == 0
    eng, th = start_engine(settings_for(url, state), url)
    try:
        publish_stream(url, rr_stream("alice", int(time.time()) // 60 * 60 - 3600, 1, seed=4))
        with Outbox(state / "stresswatch.sqlite") as ob:
            assert wait_for(lambda: [r.state for r in ob.records()] == [AlertState.DELIVERED], timeout=15.0)
            alert_id = ob.records()[0].alert_id
        res = cli("alerts", "watch", "--worker", "sam", "--broker", url, "--count", "1", "--timeout-s", "20")
        assert res.returncode == 0 and f"id={alert_id}" in res.stdout and "alice" not in res.stdout
        # shown once: a second watch does not show it again (seen ids persist)
        again = cli("alerts", "watch", "--worker", "sam", "--broker", url, "--timeout-s", "1")
        assert alert_id not in again.stdout
        assert cli("alerts", "ack", alert_id, "--worker", "sam", "--broker", url).returncode == 0
        res = cli("alerts", "resolve", alert_id, "--worker", "sam", "--broker", url, "--outcome", "reached_out", "--note", "phoned")
        assert res.returncode == 0, res.stderr
        bad = cli("alerts", "resolve", alert_id, "--worker", "sam", "--broker", url, "--outcome", "maybe")
        assert bad.returncode != 0
        with Outbox(state / "stresswatch.sqlite") as ob:
            assert wait_for(lambda: ob.get(alert_id).state is AlertState.RESOLVED, timeout=15.0)
            r = ob.get(alert_id)
            assert (r.acked_by, r.outcome, r.note, r.resolved_by) == ("sam", Outcome.REACHED_OUT, "phoned", "sam")
    finally:
        eng.request_stop()
        th.join(60)


def test_first_run_without_a_broker_starts_an_embedded_one_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "STRESSWATCH_STORE__STATE_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("STRESSWATCH_MQTT__URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stresswatch.cli", "--set", "mqtt.client_id=first-run-engine", "engine"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("engine running" in ln for ln in lines):
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert "embedded MQTT broker on mqtt://127.0.0.1:" in text and "engine running" in text, text
        port = int(text.split("mqtt://127.0.0.1:")[1].split()[0].rstrip(")"))
        # the embedded broker (amqtt) speaks MQTT 3.1.1 only
        assert json.loads(retained(port, TOPICS.engine_status, protocol=mqtt.MQTTv311))["status"] == "online"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert (tmp_path / "stresswatch.sqlite").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_expired_consent_stops_processing_and_forgets_the_user(mosquitto, tmp_path, rr_stream):
    url = mosquitto.url
    state = tmp_path / "engine"
    start_s = int(time.time()) // 60 * 60 - 3600
    publish_consent(url, "alice", tmp_path / "alice.sqlite", recipients=["sam"], expires_at=datetime.now(timezone.utc) + timedelta(seconds=4))
    eng, th = start_engine(settings_for(url, state), url)
    try:
        publish_stream(url, rr_stream("alice", start_s, 1, seed=5))
        assert wait_for(lambda: retained(mosquitto.port, TOPICS.status("alice"), timeout=0.5) not in (None, b""), timeout=15.0)
        # after expiry: status off, no more processing, detector state gone from the saved blob
        assert wait_for(lambda: json.loads(retained(mosquitto.port, TOPICS.status("alice"), timeout=0.5) or b"{}").get("status") == "off", 20)
        with Outbox(state / "stresswatch.sqlite") as ob:
            from stresswatch.engine.persist import stored_detector

            assert wait_for(lambda: "alice" not in stored_detector(ob).users, 10)
        before = eng.dropped_batches
        publish_stream(url, rr_stream("alice", start_s + 1800, 1, seed=6))  # still in the past: the future is refused
        assert wait_for(lambda: eng.dropped_batches > before, timeout=15.0)
    finally:
        eng.request_stop()
        th.join(60)


def test_withdrawal_over_the_consent_topic_stops_alerts_at_once(mosquitto, tmp_path, rr_stream):
    url = mosquitto.url
    state = tmp_path / "engine"
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    publish_consent(url, "alice", tmp_path / "alice.sqlite", recipients=["sam"])
    sam = WorkerClient(url, "sam", lambda a: None)
    eng, th = start_engine(settings_for(url, state), url)
    try:
        publish_stream(url, rr_stream("alice", start_s, 2, seed=7))
        assert wait_for(lambda: len(sam.received) == 2, timeout=15.0)
        publish_consent(url, "alice", tmp_path / "alice.sqlite")  # revoke, as `consent revoke --broker`
        assert wait_for(lambda: consent_status(state, "alice") == "revoked", timeout=15.0)
        before = eng.dropped_batches
        publish_stream(url, rr_stream("alice", start_s + 3600, 3, seed=8))
        assert wait_for(lambda: eng.dropped_batches > before, timeout=15.0)
        time.sleep(1.0)
        assert len(sam.received) == 2  # nothing after the withdrawal
        assert "alice" not in eng.pipeline.detector.users
        assert json.loads(retained(mosquitto.port, TOPICS.status("alice")))["status"] == "off"
    finally:
        eng.request_stop()
        th.join(60)
        sam.close()
