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
