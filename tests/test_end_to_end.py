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
from stresswatch.consent import ConsentLedger, Visibility
from stresswatch.detect import Detector
from stresswatch.engine import Pipeline, utc_now
from stresswatch.replay import read_samples, time_batches



def test_alert_reaches_the_chosen_worker_and_no_consent_means_no_alert(mosquitto, tmp_path, demo_cohort):
    topics = Topics()
    ledger = ConsentLedger(tmp_path / "state.sqlite")
    ledger.grant("alice", ["sam"], now=utc_now(), visibility=Visibility.LEVEL_AND_REASONS)
    # carol has not consented; 'other' worker must see nothing at all.
    sam = WorkerClient(mosquitto.url, "sam", lambda a: None, topics=topics)
    other = WorkerClient(mosquitto.url, "other", lambda a: None, topics=topics)

    # a raw subscriber to every alert topic: proves nothing about carol went out anywhere
    raw: list[mqtt.MQTTMessage] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    spy.on_message = lambda c, u, m: raw.append(m)
    subscribed = threading.Event()
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.connect("127.0.0.1", mosquitto.port)
    spy.loop_start()
    spy.subscribe(f"{topics.prefix}/alerts/+", qos=1)
    assert subscribed.wait(5)

    transport = MqttTransport(mosquitto.url, client_id="engine-test")
    pipeline = Pipeline(Detector(), transport, ledger=ledger, topics=topics)
    for batch in time_batches(read_samples([demo_cohort])):
        pipeline.process(batch)
    pipeline.finish()

    raised = {o.decision.user: o for o in pipeline.report.outcomes}
    assert set(raised) == {"alice", "carol"}
    assert raised["alice"].gate.allowed and not raised["carol"].gate.allowed

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
    pipeline = Pipeline(Detector(), transport, ledger=ledger)
    for batch in time_batches(read_samples([demo_cohort])):
        pipeline.process(batch)
    pipeline.finish()
    back = WorkerClient(mosquitto.url, "sam", lambda a: None)
    assert wait_for(lambda: len(back.received) == 1, timeout=10.0)
    back.close()
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
    assert "withheld alert for carol" in res.stdout
    assert "alerts withheld by consent │ 1" in res.stdout


def test_demo_command_with_embedded_broker():
    res = subprocess.run(
        [sys.executable, "-m", "stresswatch.cli", "demo", "--speed", "0"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "embedded MQTT broker" in res.stdout and "worker sam received" in res.stdout
