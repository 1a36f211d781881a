"""Cluster mode gives workers and users what the single engine gives them, on real processes:
a nats-server with JetStream started by the test on a free loopback port, a real Mosquitto,
the bridge (Mosquitto -> JetStream) and `stresswatch engine --cluster` subprocesses.

* a worker's ack reaches the owner of the alert's partition, also across a SIGKILL of that
  owner: an alert acknowledged before the kill (after the last snapshot) and one acknowledged
  while its partition had no owner both escalate no further, while an unacknowledged alert
  of the same partition does escalate; an ack from a worker the alert was not sent to is
  refused; ``alerts list`` gathers the worker's alerts from every partition;
* erasure: the user's data leaves the detector, the snapshot (written at once), the outbox
  and the partition's stream; the consent key is gone; the user's status topic is cleared
  (the single engine's confirmation); another user of the same partition is untouched;
* a check-in becomes an alert to the user's worker, which the worker acknowledges; per-user
  status topics say calibrating / active / off, also for a consent that ends by itself.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from stresswatch.alerts import MqttTransport, Topics
from stresswatch.alerts.lifecycle import AlertState
from stresswatch.alerts.replies import AlertView, Reply, request
from stresswatch.cluster.bridge import Bridge
from stresswatch.cluster.jetstream import JetStreamIO, open_ready
from stresswatch.cluster.layout import USER_HEADER, Layout, partition_of
from stresswatch.cluster.lists import merge_lists
from stresswatch.cluster.publish import ack_partition, put_consent
from stresswatch.cluster.snapshot import Snapshot
from stresswatch.config import ClusterSettings, MqttSettings, Settings
from stresswatch.consent.state import Action, ConsentEvent, Visibility
from stresswatch.detect import Detector
from stresswatch.errors import ClusterError
from stresswatch.wire.acks import AckAction, AckMessage
from stresswatch.wire.checkin import CheckinMessage
from stresswatch.wire.consent import encode_consent

from conftest import FAST_DETECTOR, synthetic_rr, wait_for
from nats_cluster import NatsNode, start_single
from test_cluster import Engines, expected, feed, owners

PARTITIONS = 4
TOPICS = Topics()


@pytest.fixture
def nats1(tmp_path):
    node = start_single(tmp_path / "nats")
    yield node
    node.stop()


def write_config(path: Path, mqtt_url: str, name: str, *, snapshot_s: float, escalate_after_s: int, fetch_batch: int = 1000) -> None:
    det = "\n".join(f"{k} = {v}" for k, v in FAST_DETECTOR.items())
    path.write_text(
        f'[mqtt]\nurl = "{mqtt_url}"\nclient_id = "eng-{name}"\n'
        f'[store]\nstate_dir = "{path.parent / "state"}"\n'
        f"[detector]\n{det}\n"
        f"[alerts]\ncooldown_s = 0\ncheckin_cooldown_s = 0\nescalate_after_s = {escalate_after_s}\nrenotify_after_s = 3600\nmax_reminders = 0\n"
        "[engine]\ntick_s = 0.5\ngrace_s = 0\n"
        f'[cluster]\nname = "{name}"\npartitions = {PARTITIONS}\nreplicas = 1\nlease_ttl_s = 4.0\nsnapshot_s = {snapshot_s}\n'
        f"fetch_batch = {fetch_batch}\n"
    )


def grant(jsio: JetStreamIO, layout: Layout, user: str, recipients: tuple[str, ...]) -> None:
    ev = ConsentEvent(user, Action.GRANT, datetime.now(timezone.utc), "test", recipients=recipients, visibility=Visibility.LEVEL_AND_REASONS, display_name=user)
    put_consent(jsio, layout, user, encode_consent(user, [ev]))


def revoke(jsio: JetStreamIO, layout: Layout, user: str, recipients: tuple[str, ...]) -> None:
    now = datetime.now(timezone.utc)
    ev = ConsentEvent(user, Action.GRANT, now, "test", recipients=recipients, visibility=Visibility.LEVEL_AND_REASONS, display_name=user)
    put_consent(jsio, layout, user, encode_consent(user, [ev, ConsentEvent(user, Action.REVOKE, now, "test")]))


class Wire:
    """A raw MQTT subscriber on every worker's alerts and every user's status topic."""

    def __init__(self, url: str) -> None:
        self.alerts: list[dict[str, object]] = []  # payload + "worker"
        self.status: dict[str, list[bytes]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"wire-{uuid.uuid4().hex[:6]}")
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe([("stresswatch/v1/alerts/+", 1), ("stresswatch/v1/status/+", 1)])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on(self, c, u, m) -> None:  # type: ignore[no-untyped-def]
        kind, who = m.topic.split("/")[-2:]
        with self._lock:
            if kind == "alerts":
                self.alerts.append({**json.loads(m.payload), "worker": who})
            else:
                self.status[who].append(bytes(m.payload))

    def to(self, worker: str) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(str(a["alert_id"]) for a in self.alerts if a["worker"] == worker)

    def statuses(self, user: str) -> list[str]:
        with self._lock:
            return [json.loads(p)["status"] if p else "" for p in self.status[user]]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def same_partition(prefix: str, n: int) -> list[str]:
    candidates = [f"{prefix}{i}" for i in range(200)]
    p = partition_of(candidates[0], PARTITIONS)
    return [u for u in candidates if partition_of(u, PARTITIONS) == p][:n]


def ack(url: str, worker: str, alert_id: str, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    return request(url, worker, AckMessage(action=AckAction.ACK, alert_id=alert_id), timeout_s=timeout_s)


def start_all(nats1: NatsNode, mosquitto, tmp_path: Path, *, snapshot_s: float, escalate_after_s: int, engines: tuple[str, ...], fetch_batch: int = 1000):  # type: ignore[no-untyped-def]
    name = "p" + uuid.uuid4().hex[:8]
    layout = Layout(partitions=PARTITIONS, replicas=1, name=name)
    jsio = open_ready([nats1.url], layout, name=f"test-{name}", retention_s=3600)
    config = tmp_path / f"{name}.toml"
    write_config(config, mosquitto.url, name, snapshot_s=snapshot_s, escalate_after_s=escalate_after_s, fetch_batch=fetch_batch)
    settings = Settings(mqtt=MqttSettings(url=mosquitto.url, client_id=f"bridge-{name}"), cluster=ClusterSettings(name=name, partitions=PARTITIONS, replicas=1))
    bridge = Bridge(settings, mqtt_url=mosquitto.url, servers=[nats1.url]).start()
    procs = Engines(nats1, config, tmp_path)  # type: ignore[arg-type] - a node has the url the engines need
    for e in engines:
        procs.spawn(e)
    assert wait_for(lambda: all(owners(jsio, layout).values()), 60), procs.log(engines[0])
    return name, layout, jsio, bridge, procs


def test_ack_reaches_the_alerts_partition_and_survives_its_owner_killed(nats1, mosquitto, tmp_path):
    # no periodic snapshot during the test: the new owner must find the acks in the stream
    name, layout, jsio, bridge, engines = start_all(nats1, mosquitto, tmp_path, snapshot_s=600, escalate_after_s=8, engines=("e1", "e2"))
    wire = Wire(mosquitto.url)
    try:
        u, v = same_partition(name[1:5], 2)
        for user in (u, v):
            grant(jsio, layout, user, ("sam", "kim"))
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        frames = {u: synthetic_rr(u, start_s, 2, seed=1), v: synthetic_rr(v, start_s, 1, seed=2)}
        want, _ = expected(frames)
        u_alerts = sorted(expected({u: frames[u]})[0])
        (b,) = want - set(u_alerts)
        feed(jsio, layout, frames, 0.0)
        assert wait_for(lambda: set(wire.to("sam")) >= want, 60), engines.log("e1") + engines.log("e2")
        a1, a2 = u_alerts

        reply = ack(mosquitto.url, "sam", a1)  # answered by the partition's owner
        assert reply.ok and reply.alert is not None and reply.alert.state.value == "acknowledged" and reply.alert.acked_by == "sam"
        owner = owners(jsio, layout)[partition_of(u, PARTITIONS)]
        assert owner is not None
        engines.kill(owner)  # SIGKILL: its last snapshot is older than both the raise and the ack
        killed_at = time.monotonic()
        reply = ack(mosquitto.url, "sam", a2, timeout_s=60)  # the partition has no owner now
        print(f"ack sent while the partition had no owner answered after {time.monotonic() - killed_at:.1f} s")
        assert reply.ok and reply.alert is not None and reply.alert.state.value == "acknowledged", reply
        assert owners(jsio, layout)[partition_of(u, PARTITIONS)] not in (None, owner)

        # The unacknowledged alert of the same partition escalates to the next recipient...
        assert wait_for(lambda: b in wire.to("kim"), 40), engines.log("e1") + engines.log("e2")
        time.sleep(3)
        # ...the acknowledged ones do not, and sam was sent each alert once
        assert a1 not in wire.to("kim") and a2 not in wire.to("kim")
        assert all(wire.to("sam")[a] == 1 for a in want), wire.to("sam")

        # a worker the alert was not sent to is refused, as by the single engine
        refused = ack(mosquitto.url, "kim", a1, timeout_s=30)
        assert not refused.ok and "no alert" in (refused.error or "")
        # `alerts list`: every partition's owner answers its part, the worker gets one reply
        listed = request(mosquitto.url, "kim", AckMessage(action=AckAction.LIST), timeout_s=30)
        assert listed.ok and [a.alert_id for a in listed.alerts or []] == [b]
        listed = request(mosquitto.url, "sam", AckMessage(action=AckAction.LIST), timeout_s=30)
        assert listed.ok and {a.alert_id: a.state.value for a in listed.alerts or []} == {a1: "acknowledged", a2: "acknowledged", b: "escalated"}
    finally:
        wire.close()
        engines.stop()
        bridge.close()
        jsio.close()


def test_a_new_owner_does_not_escalate_an_alert_whose_ack_is_still_to_be_replayed(nats1, mosquitto, tmp_path):
    """The snapshot holds an alert delivered and not yet acknowledged; the ack is in the stream
    far behind it (messages that arrived while the partition had no owner); the alert comes due
    while the new owner replays them (one message per pull here, each pull waiting up to 0.2 s
    for the partitions with nothing new): it must wait for the ack."""
    name, layout, jsio, bridge, engines = start_all(
        nats1, mosquitto, tmp_path, snapshot_s=2, escalate_after_s=8, engines=("e1", "e2"), fetch_batch=1
    )  # fmt: skip
    wire = Wire(mosquitto.url)
    try:
        u, v = same_partition(name[1:5], 2)
        p = partition_of(u, PARTITIONS)
        for user in (u, v):
            grant(jsio, layout, user, ("sam", "kim"))
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        frames = {u: synthetic_rr(u, start_s, 1, seed=5), v: synthetic_rr(v, start_s, 1, seed=6)}
        want, _ = expected(frames)
        (a,) = expected({u: frames[u]})[0]
        (b,) = want - {a}
        feed(jsio, layout, frames, 0.0)
        assert wait_for(lambda: set(wire.to("sam")) >= want, 60), engines.log("e1") + engines.log("e2")
        sent_at = time.monotonic()

        def delivered_in_snapshot() -> bool:
            data = read_snapshot(jsio, layout, p)
            image = tmp_path / "outbox-image.sqlite"
            image.write_bytes(Snapshot.decode(data).outbox)  # a WAL-mode image: read from a file
            db = sqlite3.connect(image)
            try:
                return db.execute("SELECT COUNT(*) FROM alerts WHERE state = 'delivered'").fetchone()[0] == 2
            finally:
                db.close()

        assert wait_for(delivered_in_snapshot, 10)
        owner = owners(jsio, layout)[p]
        assert owner is not None
        engines.kill(owner)
        assert time.monotonic() - sent_at < 6, "the alerts came due before the test could set the scene"

        async def filler() -> None:  # messages a new owner must replay before the ack (refused at the wire boundary: cheap)
            await asyncio.gather(*(jsio.js.publish(layout.subject(p), b"not a batch", headers={USER_HEADER: u}) for _ in range(60)))

        jsio.call(filler(), 60)
        reply = ack(mosquitto.url, "sam", a, timeout_s=90)
        assert reply.ok and reply.alert is not None and reply.alert.state.value == "acknowledged", reply
        print(f"ack answered {time.monotonic() - sent_at:.1f} s after the alerts were sent (escalation due after 8 s)")
        assert time.monotonic() - sent_at > 8, "the replay was over before the alert came due: nothing was tested"
        assert wait_for(lambda: b in wire.to("kim"), 30), engines.log("e1") + engines.log("e2")  # the unacknowledged one escalates
        time.sleep(2)
        assert a not in wire.to("kim")
    finally:
        wire.close()
        engines.stop()
        bridge.close()
        jsio.close()


def test_an_ack_goes_to_the_indexed_partition_else_to_one_fixed_partition_whose_owner_refuses_it():
    layout = Layout(partitions=8, replicas=1, name="x")
    alert_id = str(uuid.uuid4())
    assert ack_partition(layout, "sam", alert_id, 5) == 5
    # not in the index (or an index entry from another layout): the same partition every time
    assert ack_partition(layout, "sam", alert_id, None) == ack_partition(layout, "kim", alert_id, 99) == partition_of(alert_id, 8)
    assert ack_partition(layout, "sam", None, None) == partition_of("sam", 8)  # a list or a message that did not decode


def view(alert_id: str, raised_s: int) -> AlertView:
    return AlertView(alert_id=alert_id, user="a person you support", raised_at=datetime.fromtimestamp(raised_s, timezone.utc), state=AlertState.DELIVERED)


def test_a_list_is_merged_from_every_partition_newest_first_or_refused_when_one_is_missing():
    parts = [Reply(ok=True, action=AckAction.LIST, alerts=[view("a", 10), view("c", 30)]), Reply(ok=True, action=AckAction.LIST, alerts=[view("b", 20)])]
    got = merge_lists(parts, partitions=2, request_id="r1", limit=200)
    assert got.ok and got.request_id == "r1" and [a.alert_id for a in got.alerts or []] == ["c", "b", "a"]
    assert [a.alert_id for a in merge_lists(parts, partitions=2, request_id="r1", limit=2).alerts or []] == ["c", "b"]
    partial = merge_lists(parts[:1], partitions=2, request_id="r1", limit=200)
    assert not partial.ok and partial.alerts is None and "ask again" in (partial.error or "")
    bad = Reply(ok=False, error="not recorded: malformed")
    assert merge_lists([bad, bad], partitions=2, request_id="r2", limit=200) == bad.model_copy(update={"request_id": "r2"})


@hsettings(max_examples=60, deadline=None)
@given(
    raised=st.lists(st.integers(0, 10_000), min_size=0, max_size=30, unique=True),
    parts=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    limit=st.integers(1, 40),
)
def test_merging_the_partitions_lists_equals_listing_them_all_at_once(raised, parts, seed, limit):
    """However a worker's alerts are spread over the partitions, the merged list is the one
    list of all of them, newest first, cut at the request's limit."""
    rng = random.Random(seed)
    views = [view(f"{i:08x}-0000-0000-0000-000000000000", s) for i, s in enumerate(raised)]
    buckets: list[list[AlertView]] = [[] for _ in range(parts)]
    for v in views:
        buckets[rng.randrange(parts)].append(v)
    got = merge_lists([Reply(ok=True, action=AckAction.LIST, alerts=b) for b in buckets], partitions=parts, request_id=None, limit=limit)
    want = sorted(views, key=lambda a: (a.raised_at, a.alert_id), reverse=True)[:limit]
    assert got.ok and got.alerts == want


def read_snapshot(jsio: JetStreamIO, layout: Layout, p: int) -> bytes:
    """The partition's snapshot object. The engine replaces it every few seconds: a read can
    find it absent, or wait on chunks the replacement purged; then read again."""

    async def get() -> bytes:
        obs = await jsio.js.object_store(layout.snapshots)
        return bytes((await asyncio.wait_for(obs.get(layout.snapshot_name(p)), 5)).data)

    for _ in range(30):
        try:
            return jsio.call(get(), 10)
        except ClusterError:
            time.sleep(0.2)
    raise AssertionError("the partition's snapshot could not be read")


def partition_messages(jsio: JetStreamIO, layout: Layout, p: int) -> list[tuple[str, bytes]]:
    """Every message still in the partition's stream: (user header, payload)."""

    async def read_all() -> list[tuple[str, bytes]]:
        sub = await jsio.js.pull_subscribe(layout.subject(p), stream=layout.stream)
        out: list[tuple[str, bytes]] = []
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1)
            except Exception:  # noqa: BLE001 - nothing more
                break
            out += [((m.headers or {}).get(USER_HEADER, ""), m.data) for m in msgs]
        await sub.unsubscribe()
        return out

    return jsio.call(read_all())


def test_erasure_checkin_and_status_in_cluster_mode(nats1, mosquitto, tmp_path):
    name, layout, jsio, bridge, engines = start_all(nats1, mosquitto, tmp_path, snapshot_s=2, escalate_after_s=3600, engines=("e1",))
    wire = Wire(mosquitto.url)
    user_side = MqttTransport(mosquitto.url, client_id=f"companion-{uuid.uuid4().hex[:6]}")
    try:
        x, y, z = same_partition(f"erase{name[1:5]}x", 3)
        p = partition_of(x, PARTITIONS)
        for user in (x, y):
            grant(jsio, layout, user, ("sam",))
        # z's consent ends by itself in 15 s: no message says so, the owner's sweep finds it
        expires = datetime.now(timezone.utc) + timedelta(seconds=15)
        ev = ConsentEvent(z, Action.GRANT, datetime.now(timezone.utc), "test", recipients=("sam",), expires_at=expires)
        put_consent(jsio, layout, z, encode_consent(z, [ev]))
        feed(jsio, layout, {z: synthetic_rr(z, int(time.time()) // 60 * 60 - 3 * 3600, 0, seed=7)}, 0.0)
        assert wait_for(lambda: wire.statuses(z)[:1] == ["calibrating"], 20), wire.statuses(z)
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        frames = {x: synthetic_rr(x, start_s, 1, seed=3), y: synthetic_rr(y, start_s, 1, seed=4)}
        want, _ = expected(frames)
        feed(jsio, layout, frames, 0.0)
        assert wait_for(lambda: set(wire.to("sam")) >= want, 60), engines.log("e1")
        # status topics as the single engine publishes them: calibrating, then active
        assert wait_for(lambda: wire.statuses(x)[-1:] == ["active"], 20), wire.statuses(x)
        assert wire.statuses(x)[0] == "calibrating"

        def snapshot() -> Snapshot:
            return Snapshot.decode(read_snapshot(jsio, layout, p))

        assert wait_for(lambda: x in Detector.from_bytes(snapshot().detector).users, 20)
        assert any(x.encode() in payload for _, payload in partition_messages(jsio, layout, p))

        # erasure, as the user's companion asks for it: the retained consent message cleared
        cleared = user_side.publish(TOPICS.consent(x), b"", qos=1, retain=True)
        assert wait_for(cleared.is_published, 10)
        assert wait_for(lambda: wire.statuses(x)[-1:] == [""], 30), (wire.statuses(x), engines.log("e1"))  # the confirmation
        assert jsio.get(layout.consent, x) is None
        snap = snapshot()
        assert x.encode() not in snap.detector and x.encode() not in snap.outbox
        assert x not in Detector.from_bytes(snap.detector).users and y in Detector.from_bytes(snap.detector).users
        with sqlite3.connect(":memory:") as db:
            db.deserialize(snap.outbox)
            assert db.execute("SELECT COUNT(*) FROM alerts WHERE user = ?", (x,)).fetchone()[0] == 0
            assert db.execute("SELECT COUNT(*) FROM alerts WHERE user = ?", (y,)).fetchone()[0] == 1
        left = partition_messages(jsio, layout, p)
        assert not [h for h, payload in left if h == x or x.encode() in payload]
        local = list((tmp_path / "state" / "cluster" / "e1").glob(f"part-{p}.sqlite*"))
        assert local and not any(x.encode() in f.read_bytes() for f in local)

        # a check-in: an alert to the user's worker (reason self_report), which sam acknowledges
        msg = CheckinMessage(checkin_id=str(uuid.uuid4()), user=y, at=datetime.now(timezone.utc), note="call me")
        user_side.publish(TOPICS.checkin(y), msg.encode(), qos=1)
        assert wait_for(lambda: any(a.get("reasons") == ["self_report"] for a in wire.alerts), 30), engines.log("e1")
        (checkin_alert,) = [str(a["alert_id"]) for a in wire.alerts if a.get("reasons") == ["self_report"]]
        reply = ack(mosquitto.url, "sam", checkin_alert, timeout_s=30)
        assert reply.ok and reply.alert is not None and reply.alert.note == "call me"

        assert wait_for(lambda: wire.statuses(z)[-1:] == ["off"], 30), wire.statuses(z)
        assert datetime.now(timezone.utc) >= expires
        assert wait_for(lambda: z not in Detector.from_bytes(snapshot().detector).users, 10)
        revoke(jsio, layout, y, ("sam",))  # a consent change: the status says so
        assert wait_for(lambda: wire.statuses(y)[-1:] == ["off"], 20), wire.statuses(y)
    finally:
        wire.close()
        user_side.close()
        engines.stop()
        bridge.close()
        jsio.close()
