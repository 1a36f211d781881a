"""The whole pipeline through a real Mosquitto: fixture data -> detector -> consent gate ->
MQTT -> a subscribed support-worker client."""

import json
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt

from conftest import wait_for
from stresswatch.alerts import MqttTransport, Topics, WorkerClient
from stresswatch.alerts.dispatch import Dispatcher
from stresswatch.alerts.outbox import Outbox
from stresswatch.clock import utc_now
from stresswatch.config import Settings
from stresswatch.consent import ConsentLedger, Visibility
from stresswatch.detect import Detector
from stresswatch.pipeline import DataClock, Pipeline
from stresswatch.replay import read_samples, time_batches


def _spy(mosquitto, topics):
    """A raw subscriber to every alert topic, and the list it fills."""
    raw: list[mqtt.MQTTMessage] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    spy.on_message = lambda c, u, m: raw.append(m)
    subscribed = threading.Event()
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.connect("127.0.0.1", mosquitto.port)
    spy.loop_start()
    spy.subscribe(f"{topics.prefix}/alerts/+", qos=1)
    assert subscribed.wait(5)
    return spy, raw


def _pipeline(settings, db, ledger, transport, clock=utc_now):
    outbox = Outbox(db)
    dispatcher = Dispatcher.from_settings(settings, outbox, ledger, transport, clock=clock)
    data_clock = clock if isinstance(clock, DataClock) else None
    return Pipeline(Detector(settings.detector), dispatcher, keep_alerts=True, data_clock=data_clock)


def test_alert_reaches_the_chosen_worker_and_no_consent_means_no_alert(mosquitto, tmp_path, demo_cohort):
    topics = Topics()
    ledger = ConsentLedger(tmp_path / "state.sqlite")
    ledger.grant("alice", ["sam"], now=utc_now(), visibility=Visibility.LEVEL_AND_REASONS)
    # carol has not consented; 'other' worker must see nothing at all.
    sam = WorkerClient(mosquitto.url, "sam", lambda a: None, topics=topics)
    other = WorkerClient(mosquitto.url, "other", lambda a: None, topics=topics)

    # a raw subscriber to every alert topic: proves nothing about carol went out anywhere
    spy, raw = _spy(mosquitto, topics)

    transport = MqttTransport(mosquitto.url, client_id="engine-test")
    pipeline = _pipeline(Settings(), tmp_path / "state.sqlite", ledger, transport)
    for batch in time_batches(read_samples([demo_cohort])):
        pipeline.process(batch)
    pipeline.finish()

    raised = {o.decision.user: o for o in pipeline.report.outcomes}
    assert set(raised) == {"alice", "carol"}
    assert raised["alice"].sent and not raised["carol"].sent
    assert raised["carol"].verdict == "withheld_no_consent"

    assert wait_for(lambda: len(sam.received) == 1, timeout=10.0)
    alert = sam.received[0]
    assert alert.alert_id == raised["alice"].decision.alert_id
    assert alert.user == ledger.state("alice").display_name  # pseudonym, not the user id
    assert [r.value for r in alert.reasons] == ["hrv_below_baseline", "hr_above_baseline"]
    time.sleep(0.5)
    assert other.received == []
    assert len(raw) == 1 and raw[0].topic == topics.alerts("sam") and raw[0].qos == 1
    body = json.loads(raw[0].payload)
    assert body["schema_version"] == 1 and "alice" not in raw[0].payload.decode() and "carol" not in raw[0].payload.decode()
    # MQTT 5 message expiry travels with the alert
    assert getattr(raw[0].properties, "MessageExpiryInterval", 0) > 0

    for c in (sam, other):
        c.close()
    spy.loop_stop()
    spy.disconnect()
    transport.close()
    ledger.close()


def test_worker_offline_during_alert_receives_it_on_return(mosquitto, tmp_path, demo_cohort):
    ledger = ConsentLedger(tmp_path / "state.sqlite")
    ledger.grant("alice", ["sam"], now=utc_now())
    first = WorkerClient(mosquitto.url, "sam", lambda a: None)
    first.close()  # the persistent session stays on the broker while sam is away
    transport = MqttTransport(mosquitto.url, client_id="engine-test")
    pipeline = _pipeline(Settings(), tmp_path / "state.sqlite", ledger, transport)
    for batch in time_batches(read_samples([demo_cohort])):
        pipeline.process(batch)
    pipeline.finish()
    back = WorkerClient(mosquitto.url, "sam", lambda a: None)
    assert wait_for(lambda: len(back.received) == 1, timeout=10.0)
    back.close()
    transport.close()
    ledger.close()


def test_grant_to_a_worker_and_a_group_reaches_each_member_once(mosquitto, tmp_path, demo_cohort):
    """--to sam --to team-north: sam first, then (unacknowledged) each member of the group,
    each once; nothing is published on a topic named after the group."""
    settings = Settings(groups={"team-north": ["kim", "lee"]})
    topics = Topics()
    ledger = ConsentLedger(tmp_path / "state.sqlite")
    ledger.grant("alice", ["sam", "team-north"], now=utc_now())
    clients = {w: WorkerClient(mosquitto.url, w, lambda a: None, topics=topics) for w in ("sam", "kim", "lee", "team-north")}
    spy, raw = _spy(mosquitto, topics)

    transport = MqttTransport(mosquitto.url, client_id="engine-test")
    clock = DataClock()  # data time: the escalation delay passes as the data goes by
    pipeline = _pipeline(settings, tmp_path / "state.sqlite", ledger, transport, clock)
    for batch in time_batches(read_samples([demo_cohort])):
        clock.set_to_end_of(batch)
        pipeline.process(batch)
        pipeline.tick()
    pipeline.finish()

    (alice,) = [o for o in pipeline.report.outcomes if o.decision.user == "alice"]
    assert alice.record.targets == ("sam", "kim", "lee")
    for w in ("sam", "kim", "lee"):
        assert wait_for(lambda w=w: len(clients[w].received) == 1, timeout=10.0), w
        assert clients[w].received[0].alert_id == alice.decision.alert_id
    time.sleep(0.5)
    assert clients["team-north"].received == []
    assert {m.topic for m in raw} == {topics.alerts(w) for w in ("sam", "kim", "lee")}
    for c in clients.values():
        c.close()
    spy.loop_stop()
    spy.disconnect()
    transport.close()
    ledger.close()


def test_demo_command_against_mosquitto(mosquitto):
    res = subprocess.run(
        [sys.executable, "-m", "stresswatch.cli", "demo", "--broker", mosquitto.url, "--speed", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "worker sam received" in res.stdout
    # alice chose sam then the team-north group: each member receives her alert once
    assert "group team-north (kim, lee)" in res.stdout
    assert res.stdout.count("worker kim received") == 1 and res.stdout.count("worker lee received") == 1
    assert "withheld alert for carol" in res.stdout
    assert "alerts withheld by consent │ 1" in res.stdout


def test_demo_command_with_embedded_broker():
    res = subprocess.run(
        [sys.executable, "-m", "stresswatch.cli", "demo", "--speed", "0"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "embedded MQTT broker" in res.stdout and "worker sam received" in res.stdout
