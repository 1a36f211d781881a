"""The load harness's publishing path (benchmarks/load): simulated users' batches, sent by the
raw MQTT publisher through a real Mosquitto, reach the engine's IngestReceiver with every
sample exactly once and in order. The capacity figures in benchmarks/RESULTS.md rely on it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "load"))

from mqttpub import RawPublisher  # noqa: E402
from users import DAY_NS, NS, BatchMaker, Plan, synthetic_templates  # noqa: E402

from stresswatch.ingest import IngestBatch, IngestReceiver  # noqa: E402

T0_WALL = 1_764_072_000.0  # 2025-11-25 12:00 UTC: the harness's clock is injected, not slept on


@pytest.mark.mosquitto
@pytest.mark.parametrize("fmt", ["binary", "json"])
def test_every_sample_of_every_user_arrives_once_in_order(mosquitto, fmt):
    start = int(T0_WALL * NS) // DAY_NS * DAY_NS - 2 * DAY_NS
    templates = synthetic_templates(3, start)
    plan = Plan.make(6, 10.0, 300, 0, T0_WALL, 180.0, templates, fmt, run_id="t")
    makers = [BatchMaker(plan, templates, np.arange(p, 6, 2)) for p in range(2)]  # two publisher shares
    got: list[IngestBatch] = []
    rx = IngestReceiver(mosquitto.url, got.append, client_id="test-load-engine")
    conns = [RawPublisher("127.0.0.1", mosquitto.port, f"test-load-{k}") for k in range(2)]
    sent = 0
    try:
        for step in range(1, 7):  # six 10-s rounds of every user
            now_ns = int((T0_WALL + 10 * step) * NS)
            for k, maker in enumerate(makers):
                for local in range(len(maker.users)):
                    out = maker.make(local, now_ns)
                    assert out is not None
                    conns[k].queue(out[0], out[1])
                    sent += 1
        for c in conns:
            c.flush()
            assert c.wait_acks(10)
        deadline = time.monotonic() + 10
        while rx.accepted < sent and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for c in conns:
            c.close()
        rx.close()
    assert rx.accepted == sent == 36 and rx.duplicates == 0 and not rx.rejected
    sample_t0 = int(T0_WALL * NS) + plan.offset_ns
    shifts = plan.shift_ns(6) + plan.day_shift_ns
    for i in range(6):
        mine = [b for b in got if b.user == plan.user(i)]
        assert [b.seq for b in mine] == list(range(6))
        times = np.concatenate([b.time_ns for b in mine])
        j = i % templates.count
        tt = templates.t[templates.off[j] : templates.off[j + 1]] + shifts[i]
        expected = tt[(tt >= sample_t0) & (tt <= sample_t0 + 60 * NS)]
        assert np.array_equal(times, expected)  # nothing lost, nothing twice, in order
        values = np.concatenate([b.value for b in mine])
        vv = templates.value[templates.off[j] : templates.off[j + 1]][(tt >= sample_t0) & (tt <= sample_t0 + 60 * NS)]
        assert np.array_equal(values, vv)


# -- reconciliation: every raised alert accounted for before a percentile (benchmarks/load/reconcile.py)
import math  # noqa: E402

from hypothesis import given, strategies as st  # noqa: E402
from reconcile import Receipt, reconcile  # noqa: E402


def test_an_alert_past_the_deadline_is_lost_and_puts_the_p99_at_infinity():
    receipts = [Receipt(f"a{i}", 10.0 + i, lat) for i, lat in enumerate((0.2, 0.4, 0.6, 0.8))]  # on time
    receipts.append(Receipt("a4", 99.0, 0.3))  # arrived after the deadline
    receipts.append(Receipt("a1", 20.0, 5.0))  # a re-send of a1: a duplicate, not a delivery
    r = reconcile(raised=5, withheld=0, suppressed=0, receipts=receipts, deadline_s=60.0)
    assert (r.expected, r.delivered, r.lost, r.late, r.duplicates) == (5, 4, 1, 1, 1)
    assert r.reconciled
    assert r.percentile_s(50) == 0.6  # nearest rank over all five: 0.2 0.4 0.6 0.8 inf
    assert r.percentile_s(80) == 0.8
    assert math.isinf(r.percentile_s(99))  # not the p99 of the four that arrived
    assert r.summary()["latency_p99_s"] == "inf"


def test_withheld_and_suppressed_alerts_are_not_expected_and_extra_receipts_break_reconciliation():
    r = reconcile(raised=4, withheld=1, suppressed=1, receipts=[Receipt("a", 1.0, 0.5), Receipt("b", 1.0, 0.7)], deadline_s=5.0)
    assert (r.expected, r.delivered, r.lost) == (2, 2, 0) and r.reconciled and r.percentile_s(99) == 0.7
    extra = reconcile(raised=1, withheld=0, suppressed=0, receipts=[Receipt("a", 1.0, 0.5), Receipt("b", 1.0, 0.7)], deadline_s=5.0)
    assert extra.unexpected == 1 and not extra.reconciled  # the workers saw an alert the engine did not count
    unknown = reconcile(raised=2, withheld=0, suppressed=0, receipts=[Receipt("a", 1.0, None), Receipt("b", 1.0, 0.4)], deadline_s=5.0)
    assert unknown.unmatched == 1 and unknown.delivered == 2 and math.isinf(unknown.percentile_s(99))
    assert reconcile(raised=0, withheld=0, suppressed=0, receipts=[], deadline_s=1.0).percentile_s(99) is None


@given(
    raised=st.integers(0, 30),
    arrivals=st.lists(st.tuples(st.integers(0, 40), st.floats(0, 100), st.floats(0, 10)), max_size=60),
    deadline=st.floats(0, 100),
)
def test_every_expected_alert_is_delivered_or_lost(raised, arrivals, deadline):
    receipts = [Receipt(f"a{k}", t, lat) for k, t, lat in arrivals]
    r = reconcile(raised=raised, withheld=0, suppressed=0, receipts=receipts, deadline_s=deadline)
    assert r.delivered + r.lost == r.expected == raised == len(r.latencies_s)
    assert r.duplicates == len(receipts) - len({x.alert_id for x in receipts})
    assert list(r.latencies_s) == sorted(r.latencies_s)
    assert sum(math.isinf(x) for x in r.latencies_s) >= r.lost
