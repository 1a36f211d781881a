"""Cluster mode's pure parts: the partition of a user (the same as NATS's own subject
mapping, checked against a real nats-server), leases, the snapshot format, status rows."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from stresswatch.broker import free_port
from stresswatch.cluster.layout import partition_of
from stresswatch.cluster.lease import Lease, plan
from stresswatch.cluster.snapshot import Snapshot
from stresswatch.cluster.status import partition_rows
from stresswatch.errors import StorageError

from conftest import wait_listening
from nats_cluster import NATS_SERVER

ids = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,30}", fullmatch=True)


def test_partition_of_equals_the_servers_partition_mapping(tmp_path):
    """A server-side mapping `in.* -> out.{{partition(7,1)}}.{{wildcard(1)}}` puts every user
    where partition_of does: companions on NATS's own MQTT listener could be mapped there."""
    if NATS_SERVER is None:
        pytest.fail("nats-server is not installed (apt-get install nats-server)")
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{port}\nmappings = {{\n  "in.*": "out.{{{{partition(7,1)}}}}.{{{{wildcard(1)}}}}"\n}}\n')
    proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    users = [f"user-{i}" for i in range(200)] + ["alice", "bob", "Zoë_1"[:4]]
    try:
        wait_listening(proc, port, "nats-server", lambda: proc.stderr.read().decode() if proc.stderr else "")

        async def route() -> dict[str, int]:
            import nats

            nc = await nats.connect(f"nats://127.0.0.1:{port}")
            got: dict[str, int] = {}
            sub = await nc.subscribe("out.>")
            for u in users:
                await nc.publish(f"in.{u}", b"")
            for _ in users:
                m = await sub.next_msg(timeout=5)
                _, p, u = m.subject.split(".", 2)
                got[u] = int(p)
            await nc.close()
            return got

        got = asyncio.run(route())
    finally:
        proc.kill()
        proc.wait(5)
    assert got == {u: partition_of(u, 7) for u in users}


@given(ids, st.integers(1, 64))
def test_a_user_has_one_partition_in_range(user, n):
    assert 0 <= partition_of(user, n) < n


def test_users_spread_over_partitions():
    counts = [0] * 16
    for i in range(16_000):
        counts[partition_of(f"u{i}", 16)] += 1
    assert min(counts) > 800 and max(counts) < 1200


NOW = 1_000_000.0


def test_a_first_engine_takes_every_free_partition():
    p = plan({}, "a", set(), 1, NOW, 8)
    assert p.take == tuple(range(8)) and p.release == ()


def test_two_engines_share_and_the_one_above_its_share_releases():
    held = {i: Lease("a", NOW + 5) for i in range(8)}
    assert plan(held, "a", set(range(8)), 2, NOW, 8).release == (7,)
    # the newcomer takes only what is free, up to its share
    assert plan({**held, 7: None}, "b", set(), 2, NOW, 8).take == (7,)


def test_an_expired_lease_is_taken_whatever_the_share():
    leases = {0: Lease("dead", NOW - 1), 1: Lease("b", NOW + 5), 2: Lease("a", NOW + 5), 3: Lease("a", NOW + 5)}
    assert plan(leases, "a", {2, 3}, 3, NOW, 4).take == (0,)


def test_a_live_lease_of_another_engine_is_never_taken():
    leases = {0: Lease("b", NOW + 0.5)}
    assert 0 not in plan(leases, "a", set(), 1, NOW, 1).take


@given(st.dictionaries(st.integers(0, 7), st.one_of(st.none(), st.builds(Lease, st.sampled_from(["a", "b", "c"]), st.floats(NOW - 10, NOW + 10)))),
       st.integers(1, 3))  # fmt: skip
def test_plan_takes_only_free_or_expired_and_releases_only_its_own(leases, live):
    owned = {p for p, l in leases.items() if l is not None and l.owner == "a" and l.live(NOW)}
    pl_ = plan(leases, "a", owned, live, NOW, 8)
    for p in pl_.take:
        assert p not in owned and (leases.get(p) is None or not leases[p].live(NOW))
    assert set(pl_.release) <= owned


def test_lease_values_round_trip_and_garbage_is_free():
    assert Lease.decode(Lease("e1", 12.5).encode()) == Lease("e1", 12.5)
    assert Lease.decode(b"not json") is None and Lease.decode(None) is None and Lease.decode(b'{"owner": 1}') is None


@settings(max_examples=50)
@given(st.integers(0, 1023), st.integers(0, 2**63), st.binary(max_size=300), st.binary(max_size=300),
       st.lists(st.tuples(ids, ids, st.integers(0, 10**6), st.lists(st.integers(0, 10**6), max_size=3)), max_size=5))  # fmt: skip
def test_snapshot_round_trips(p, seq, det, outbox, dedup):
    rows = [[u, s, f, sorted(a)] for u, s, f, a in dedup]
    snap = Snapshot(p, seq, 1.5, "e1", det, outbox, rows, 7)
    assert Snapshot.decode(snap.encode()) == snap


@given(st.binary(max_size=200))
def test_a_damaged_snapshot_is_a_storage_error(data):
    good = Snapshot(1, 2, 3.0, "e", b"det", b"db", []).encode()
    for bad in (data, good[:-1], good + b"x", good[:12] + b"{" + good[13:]):
        if bad == good:
            continue
        with pytest.raises(StorageError):
            Snapshot.decode(bad)


def test_status_rows_show_owner_lag_and_snapshot():
    rows = partition_rows(
        2,
        {0: Lease("e1", NOW + 3), 1: Lease("e2", NOW - 1)},
        {0: (120, 4), 1: (80, 9)},
        {0: {"seq": 100, "saved_at_s": NOW - 30, "bytes": 5000, "owner": "e1"}, 1: None},
        NOW,
    )
    assert rows[0].owner == "e1" and rows[0].pending == 4 and rows[0].snapshot_lag == 20 and rows[0].snapshot_age_s == 30
    assert rows[1].owner is None and rows[1].pending is None and rows[1].snapshot_seq is None
