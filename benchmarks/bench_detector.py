"""Detector throughput: whole batch pass (beats/s) and the live streaming tick.

    python benchmarks/bench_detector.py [--users 12] [--days 7] [--tick-users 100000] [--repeat 3]

Runs on one core: POLARS_MAX_THREADS=1 is set below before polars is imported (numpy is
single-threaded for these operations). Prints:

* batch: the seeded evaluation cohort (fixtures/cohort.py) through ``Detector.update`` +
  ``flush`` (features + baseline + episodes), best of --repeat; and, as a reference in the
  same run, a polars group-by computing only RMSSD per 5-minute window;
* tick: --tick-users users sending their latest minute of beats (about 75 each) per tick;
  after a warm-up tick, the time of ``update(batch)`` + ``advance(now)`` for a tick inside a
  window and for the tick that closes the 5-minute windows of all users.
"""

from __future__ import annotations

import os

os.environ["POLARS_MAX_THREADS"] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from stresswatch.config import DetectorSettings  # noqa: E402
from stresswatch.detect import Detector  # noqa: E402
from stresswatch_fixtures.cohort import CohortSpec, simulate  # noqa: E402

NS = 1_000_000_000


def best(fn, repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time of this process (the machine is shared: CPU time
    excludes waiting for a core, so it is the fairer one-core figure; both are printed)."""
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def polars_reference(samples: pl.DataFrame) -> pl.DataFrame:
    return (
        samples.filter(pl.col("metric") == "rr_ms")
        .group_by("user", pl.col("time").dt.truncate("5m"), maintain_order=True)
        .agg((pl.col("value").diff().pow(2).mean().sqrt()).alias("rmssd"))
    )


def tick_batches(users: int, minutes: int, start_ns: int, seed: int = 1) -> list[pl.DataFrame]:
    """``minutes`` one-minute batches of beats for ``users`` users (HR 60-90, RMSSD ~40 ms)."""
    rng = np.random.default_rng(seed)
    names = pl.Series("user", [f"u{i:06d}" for i in range(users)])
    mean_rr = rng.uniform(667, 1000, users)
    phase = rng.uniform(0, 1000, users)  # ms into the first minute of each user's first beat
    out = []
    for m in range(minutes):
        per = np.floor((60000 - 1) / mean_rr).astype(np.int64)
        counts = per.copy()
        idx = np.repeat(np.arange(users), counts)
        k = np.arange(len(idx)) - np.repeat(np.cumsum(counts) - counts, counts)
        rr = mean_rr[idx] + 28 * rng.standard_normal(len(idx))
        t = start_ns + (m * 60000 + phase[idx] + k * mean_rr[idx]) * 1e6
        out.append(
            pl.DataFrame(
                {
                    "user": names.gather(idx),
                    "time": pl.Series(t.astype(np.int64)).cast(pl.Datetime("ns", "UTC")),
                    "metric": pl.Series(["rr_ms"]).gather(np.zeros(len(idx), np.int64)),
                    "value": rr,
                    "source": pl.Series(["bench"]).gather(np.zeros(len(idx), np.int64)),
                }
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--tick-users", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-batch", action="store_true")
    a = ap.parse_args()
    print(
        f"date {date.today()}  machine {platform.machine()} python {platform.python_version()} "
        f"numpy {np.__version__} polars {pl.__version__}  POLARS_MAX_THREADS={os.environ['POLARS_MAX_THREADS']}"
    )
    s = DetectorSettings()
    if not a.skip_batch:
        samples, _ = simulate(CohortSpec(users=a.users, days=a.days))
        beats = int((samples.get_column("metric") == "rr_ms").sum())

        def whole() -> None:
            d = Detector(s)
            d.update(samples)
            d.flush()

        (t_det, c_det) = best(whole, a.repeat)
        (t_ref, c_ref) = best(lambda: polars_reference(samples), a.repeat)
        print(f"batch: cohort {a.users} users x {a.days} days, {samples.height:,} samples, {beats:,} beats (wall | CPU time)")
        print(f"  whole detector (features + baseline + episodes) {beats / t_det:14,.0f} | {beats / c_det:14,.0f} beats/s  ({t_det:.3f} | {c_det:.3f} s)")
        print(f"  reference: polars group-by RMSSD only           {beats / t_ref:14,.0f} | {beats / c_ref:14,.0f} beats/s  ({t_ref:.3f} | {c_ref:.3f} s)")

    start = 1_772_409_600 * NS  # 2026-03-02 00:00 UTC, a window boundary
    batches = tick_batches(a.tick_users, 11, start)
    d = Detector(s)
    per_tick = []
    for m, b in enumerate(batches):
        now = start + (m + 1) * 60 * NS + 5 * NS  # the batch of minute m arrives 5 s after it ends
        t, c = time.perf_counter(), time.process_time()
        out = d.update(b)
        out2 = d.advance(now, grace_s=60)
        per_tick.append((time.perf_counter() - t, time.process_time() - c, b.height, out.windows.height + out2.windows.height))
    print(f"tick: {a.tick_users:,} users, latest minute each ({batches[0].height:,} beats per tick)")
    for m, (dt, ct, n, w) in enumerate(per_tick):
        print(f"  minute {m:2d}: wall {dt * 1e3:8.1f} ms  CPU {ct * 1e3:8.1f} ms  beats {n:,}  windows finished {w:,}")
    inside = [ct for (_, ct, _, w) in per_tick[1:] if w == 0]
    closing = [ct for (_, ct, _, w) in per_tick[1:] if w > 0]
    print(f"  CPU time: tick inside a window median {np.median(inside) * 1e3:.0f} ms; window-closing tick max {max(closing) * 1e3:.0f} ms")
    print(f"  detector state per user: {d.state_bytes_per_user():,} B (+ buffered beats of open windows)")


if __name__ == "__main__":
    main()
