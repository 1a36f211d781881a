"""Companions on NATS's own MQTT listener (cluster.companions = "nats-mqtt"), end to end on
real processes: a nats-server started here on free loopback ports with JetStream, its MQTT
listener and the subject mappings `stresswatch cluster nats-conf` writes; companions publish
consent (retained) and ingest batches over MQTT 3.1.1 QoS 1; a `stresswatch engine --cluster`
subprocess consumes them from its partitions and raises alerts; a worker subscribed on the
same listener receives them. No Mosquitto and no bridge."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from stresswatch.alerts import MqttTransport, Topics
from stresswatch.cluster.layout import Layout, partition_of
from stresswatch.cluster.natsconf import mqtt_mappings, topic_subject
from stresswatch.consent.state import Action, ConsentEvent, Visibility
from stresswatch.ingest import IngestBatch
from stresswatch.wire.consent import encode_consent

from conftest import FAST_DETECTOR, synthetic_rr, wait_for
from nats_cluster import start_cluster
from test_cluster import AlertCounter, _now, connect_layout, expected, minute_batches, owners, published_windows

TOPICS = Topics()
PARTITIONS = 4
WORKER = "sam"


def test_mappings_put_ingest_on_the_users_partition_and_consent_in_the_bucket():
    layout = Layout(partitions=PARTITIONS, replicas=1, name="sw", user_token=True)
    assert mqtt_mappings(layout, "stresswatch/v1") == {
        "stresswatch.v1.ingest.*": "sw.ingest.{{partition(4,1)}}.{{wildcard(1)}}",
        "stresswatch.v1.consent.*": "$KV.sw_consent.{{wildcard(1)}}",
    }
    assert layout.subject(3) == "sw.ingest.3.*"
    assert layout.ingest_subject("alice") == f"sw.ingest.{partition_of('alice', PARTITIONS)}.alice"
    assert layout.user_of("sw.ingest.3.alice") == "alice"
    assert Layout().user_of("sw.ingest.3") == ""  # the bridge's subjects carry the user in a header
    with pytest.raises(ValueError):
        topic_subject("stresswatch/v1/ingest/a.b")  # nats-server 2.9 refuses a topic with a dot
    with pytest.raises(ValueError):
        mqtt_mappings(Layout(), "stresswatch/v1")  # the bridge's layout has no user token


def test_companions_on_the_nats_mqtt_listener_reach_a_worker_through_the_cluster_engine(tmp_path):
    name = "m" + uuid.uuid4().hex[:6]
    layout = Layout(partitions=PARTITIONS, replicas=1, name=name, user_token=True)
    nats = start_cluster(tmp_path / "nats", 1, mqtt_layout=layout)
    mqtt_url = f"mqtt://127.0.0.1:{nats.nodes[0].mqtt_port}"
    jsio = connect_layout(nats, layout)
    config = tmp_path / "sw.toml"
    det = "\n".join(f"{k} = {v}" for k, v in FAST_DETECTOR.items())
    config.write_text(
        f'[mqtt]\nurl = "{mqtt_url}"\nclient_id = "eng-{name}"\n[store]\nstate_dir = "{tmp_path / "state"}"\n[detector]\n{det}\n'
        "[alerts]\ncooldown_s = 0\nescalate_after_s = 3600\n[engine]\ntick_s = 0.5\ngrace_s = 0\n"
        f'[cluster]\nname = "{name}"\npartitions = {PARTITIONS}\nreplicas = 1\nlease_ttl_s = 4\nsnapshot_s = 2\ncompanions = "nats-mqtt"\n'
    )
    log = (tmp_path / "engine.log").open("ab")
    engine = subprocess.Popen(
        [sys.executable, "-m", "stresswatch.cli", "engine", "--config", str(config), "--cluster", nats.url, "--engine-id", "e1", "--publish-windows"],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    counter = AlertCounter(mqtt_url)  # the worker's side: NATS's MQTT listener, MQTT 3.1.1, QoS 1
    companion = MqttTransport(mqtt_url, client_id=f"companion-{name}", protocol="3.1.1")
    try:
        users = [f"n{name[1:4]}{i}" for i in range(3)]
        for u in users:  # consent over MQTT: mapped into the consent bucket the engine watches
            ev = ConsentEvent(u, Action.GRANT, _now(), "mqtt", recipients=(WORKER,), visibility=Visibility.LEVEL_AND_REASONS, display_name=u)
            assert wait_for(companion.publish(TOPICS.consent(u), encode_consent(u, [ev]), qos=1, retain=True).is_published, 10)
        assert wait_for(lambda: all(jsio.get(layout.consent, u) is not None for u in users), 10)
        assert wait_for(lambda: all(owners(jsio, layout).values()), 60), (tmp_path / "engine.log").read_text()[-3000:]

        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        frames = {u: synthetic_rr(u, start_s, 1, seed=i) for i, u in enumerate(users)}
        want_alerts, want_windows = expected(frames)
        assert len(want_alerts) == len(users)
        # a batch claiming another user on a companion's own topic is refused by the engine
        intruder = IngestBatch.from_frame(minute_batches(frames[users[1]])[0], user=users[1], stream_id="x", seq=0, source="synthetic").encode()
        assert wait_for(companion.publish(TOPICS.ingest(users[0]), intruder, qos=1).is_published, 10)
        parts = {u: minute_batches(f) for u, f in frames.items()}
        for seq in range(max(len(p) for p in parts.values())):
            for u, p in parts.items():
                if seq < len(p):
                    payload = IngestBatch.from_frame(p[seq], user=u, stream_id="s1", seq=seq, source="synthetic").encode()
                    assert wait_for(companion.publish(TOPICS.ingest(u), payload, qos=1).is_published, 10)  # PUBACK from nats-server
        # every batch is in the stream, on its user's partition
        assert sum(jsio.partition_info(p)[0] > 0 for p in {partition_of(u, PARTITIONS) for u in users}) == len({partition_of(u, PARTITIONS) for u in users})
        assert wait_for(lambda: set(counter.counts()) >= want_alerts, 90), (tmp_path / "engine.log").read_text()[-3000:]
        time.sleep(1.0)
        assert set(counter.counts()) == want_alerts and max(counter.counts().values()) == 1  # each alert once, and only these
        got = published_windows(jsio, layout)
        assert got.select("user", "window_start").equals(want_windows.select("user", "window_start"))  # the intruder's batch was not taken
    finally:
        companion.close()
        counter.close()
        engine.terminate()
        try:
            engine.wait(30)
        except subprocess.TimeoutExpired:
            engine.kill()
        jsio.close()
        nats.stop()
