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
from hypothesis import given, strategies as st

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


@given(user=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}", fullmatch=True), partitions=st.integers(1, 1024))
def test_the_engine_reads_back_the_user_the_mapping_put_in_the_subject(user, partitions):
    """Ids without a dot (the only ones NATS's MQTT listener carries): the user token of the
    subject a companion's batch lands on is the user, on the user's partition."""
    layout = Layout(partitions=partitions, name="sw", user_token=True)
    subject = layout.ingest_subject(user)
    assert layout.user_of(subject) == user
    assert subject.split(".")[2] == str(partition_of(user, partitions))
    assert Layout(partitions=partitions).user_of(Layout(partitions=partitions).ingest_subject(user)) == ""


@pytest.mark.parametrize("alerts_on", ["nats-mqtt", "mosquitto"])
def test_companions_on_the_nats_mqtt_listener_reach_a_worker_through_the_cluster_engine(tmp_path, request, alerts_on):
    """Workers on the same listener (MQTT 3.1.1), or on Mosquitto (MQTT 5: alert expiry,
    reason codes) while companions publish to NATS's listener."""
    name = "m" + uuid.uuid4().hex[:6]
    layout = Layout(partitions=PARTITIONS, replicas=1, name=name, user_token=True)
    nats = start_cluster(tmp_path / "nats", 1, mqtt_layout=layout)
    companions_url = f"mqtt://127.0.0.1:{nats.nodes[0].mqtt_port}"
    mqtt_url = companions_url if alerts_on == "nats-mqtt" else request.getfixturevalue("mosquitto").url
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
    counter = AlertCounter(mqtt_url)  # the worker's side, QoS 1
    companion = MqttTransport(companions_url, client_id=f"companion-{name}", protocol="3.1.1")
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


def _client(port: int, cid: str, user: str | None = None, password: str | None = None, proto: int = 4):  # type: ignore[no-untyped-def]
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5 if proto == 5 else mqtt.MQTTv311)
    if user is not None:
        c.username_pw_set(user, password)
    got: list[tuple[str, bytes, bool]] = []
    refused: list[str] = []
    c.on_message = lambda _c, _u, m: got.append((m.topic, m.payload, bool(m.retain)))
    c.on_connect = lambda _c, _u, _f, rc, _p=None: refused.append(str(rc)) if rc != 0 else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    wait_for(lambda: c.is_connected() or bool(refused), 10)
    return c, got, refused


def test_what_the_nats_mqtt_listener_keeps_and_loses_of_mqtt(tmp_path):
    """The feature table of docs/CLUSTER.md, on nats-server itself: MQTT 5 refused at CONNECT
    (so no message expiry, reason codes, session expiry, user properties), QoS 2 publish
    refused, a topic with a dot refused, retained kept, per-user permissions enforced but
    acknowledged silently."""
    from stresswatch.broker import free_port

    from nats_cluster import NatsNode

    port, mport = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'server_name: feat\nlisten: 127.0.0.1:{port}\njetstream {{\n  store_dir: "{tmp_path / "store"}"\n}}\nmqtt {{\n  listen: 127.0.0.1:{mport}\n}}\n'
        "authorization {\n  users = [\n"
        '    {user: alice, password: pa, permissions: {publish: {allow: ["stresswatch.v1.ingest.alice"]}, subscribe: {allow: ["stresswatch.v1.ingested.alice"]}}}\n'
        "    {user: eng, password: pe}\n  ]\n}\n"
    )
    node = NatsNode("feat", port, 0, conf, mqtt_port=mport)
    node.start()
    clients = []
    try:
        v5, _, refused = _client(mport, "v5", "eng", "pe", proto=5)
        clients.append(v5)
        assert not v5.is_connected() and refused  # MQTT 5: "unsupported protocol version"
        eng, got, _ = _client(mport, "eng", "eng", "pe")
        alice, _, _ = _client(mport, "alice", "alice", "pa")
        clients += [eng, alice]
        eng.subscribe("stresswatch/v1/ingest/+", qos=1)
        time.sleep(0.5)
        denied = alice.publish("stresswatch/v1/ingest/bob", b"as-bob", qos=1)  # not her topic
        ok = alice.publish("stresswatch/v1/ingest/alice", b"as-alice", qos=1)
        assert wait_for(lambda: ok.is_published() and denied.is_published(), 10)  # both PUBACKed: no reason code in 3.1.1
        assert wait_for(lambda: len(got) >= 1, 10)
        time.sleep(0.5)
        assert [g[:2] for g in got] == [("stresswatch/v1/ingest/alice", b"as-alice")]  # the denied one went nowhere
        assert alice.is_connected()
        assert wait_for(eng.publish("stresswatch/v1/consent/carol", b"retained", qos=1, retain=True).is_published, 10)
        late, got_late, _ = _client(mport, "late", "eng", "pe")
        clients.append(late)
        late.subscribe("stresswatch/v1/consent/+", qos=1)
        assert wait_for(lambda: ("stresswatch/v1/consent/carol", b"retained", True) in got_late, 10)  # retained: kept
        q2, _, _ = _client(mport, "q2", "eng", "pe")
        clients.append(q2)
        q2.publish("stresswatch/v1/ingest/x", b"q2", qos=2)
        assert wait_for(lambda: not q2.is_connected(), 10)  # "publish QoS=2 not supported": disconnected
        dotted, _, _ = _client(mport, "dotted", "eng", "pe")
        clients.append(dotted)
        dotted.publish("stresswatch/v1/ingest/a.b", b"x", qos=1)  # a user id with a dot: valid for us
        assert wait_for(lambda: not dotted.is_connected(), 10)  # "characters ' ' and '.' not supported": disconnected
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        node.stop()


def test_cluster_nats_conf_writes_a_node_that_partitions_mqtt_ingest(tmp_path, capsys):
    """`stresswatch cluster nats-conf`'s output runs as is: a batch a companion publishes on the
    node's MQTT listener lands in the stream on its user's partition, with the user as the last
    token; without companions = "nats-mqtt" the command refuses (the engines would not read it)."""
    from stresswatch.broker import free_port
    from stresswatch.cli import main

    from nats_cluster import NatsNode

    plain = tmp_path / "plain.toml"
    plain.write_text("")
    assert main(["--config", str(plain), "cluster", "nats-conf", "--server-name", "x", "--store", str(tmp_path / "s0")]) != 0
    capsys.readouterr()
    cfg = tmp_path / "sw.toml"
    cfg.write_text('[cluster]\nname = "cn"\npartitions = 8\nreplicas = 1\ncompanions = "nats-mqtt"\n')
    port, mport = free_port(), free_port()
    args = ["--server-name", "cn1", "--listen", f"127.0.0.1:{port}", "--mqtt", f"127.0.0.1:{mport}", "--store", str(tmp_path / "store")]
    assert main(["--config", str(cfg), "cluster", "nats-conf", *args]) == 0
    conf = tmp_path / "nats.conf"
    conf.write_text(capsys.readouterr().out)
    node = NatsNode("cn1", port, 0, conf, mqtt_port=mport)
    node.start()
    layout = Layout(partitions=8, replicas=1, name="cn", user_token=True)
    from stresswatch.cluster.jetstream import open_ready

    jsio = open_ready([node.url], layout, name="test-cn", retention_s=3600)
    companion = MqttTransport(f"mqtt://127.0.0.1:{mport}", client_id="companion-cn", protocol="3.1.1")
    try:
        assert wait_for(companion.publish(TOPICS.ingest("zoe"), b"batch", qos=1).is_published, 10)
        p = partition_of("zoe", 8)
        assert wait_for(lambda: jsio.partition_info(p)[0] == 1, 10)
        msg = jsio.call(jsio.js.get_last_msg(layout.stream, layout.subject(p)))
        assert (msg.subject, bytes(msg.data)) == (f"cn.ingest.{p}.zoe", b"batch")
    finally:
        companion.close()
        jsio.close()
        node.stop()
