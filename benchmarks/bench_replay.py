"""Replay throughput in user-days per second at --speed 0, end to end (read, detect, write).

    python benchmarks/bench_replay.py --users 100 --days 10     # 1,000 user-days (full)
    python benchmarks/bench_replay.py --users 10 --days 2       # quick
    POLARS_MAX_THREADS=1 python benchmarks/bench_replay.py --users 6 --days 12 --mixed   # mixed metrics, one file (issue 12)

Generates a simulated cohort at 1 beat/s per user (RR around 1000 ms with AR(1) beat-to-beat
variability and a day/night rhythm; one Parquet file per user, as a study would hold it)
into --data (reused if present), then replays it with ``stresswatch.replay`` and reports the
time per phase: reading input (planning, reading, cleaning, cutting into days), the pipeline
(detector, consent gate), writing outputs, with the wall and CPU time, the load average and
the peak RSS of the process. The reference in the same run is a bare ``polars.read_parquet``
of the same files, the floor for the reading phase. Targets: 1,000 user-days in under 60 s on
one core (issue 6); mixed input at >= 20 user-days/s with peak memory set by a part of the
file, not its size (issue 12). ``--part-rows`` (memory only) defaults to the product's.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

T0 = int(datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp()) * 1_000_000_000


def generate(folder: Path, users: int, days: int, seed: int = 7) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    n = days * 86400  # 1 beat/s on average
    for u in range(users):
        path = folder / f"user{u:05d}.parquet"
        paths.append(path)
        if path.exists():
            continue
        t_s = np.arange(n, dtype=np.float64)
        night = ((t_s / 3600.0) % 24 < 7).astype(np.float64)
        e = rng.standard_normal(n)
        ar = np.empty(n)
        # AR(1) with phi 0.5 by a vectorised filter: scipy.signal.lfilter is exact and fast
        from scipy.signal import lfilter

        ar = lfilter([np.sqrt(1 - 0.25)], [1.0, -0.5], e)
        rr = 1000.0 + 120.0 * night + 35.0 * (1 + 0.4 * night) * ar
        time_ns = T0 + np.cumsum(rr * 1e6).astype(np.int64)
        pl.DataFrame(
            {
                "user": f"user{u:05d}",
                "time": pl.Series(time_ns).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
                "metric": "rr_ms",
                "value": np.round(rr, 1),
                "source": "sim/strap",
            }
        ).write_parquet(path)
    return paths


def generate_mixed(folder: Path, users: int, days: int, seed: int = 11) -> list[Path]:
    """One file holding, for the same people, per-beat RR (a strap), HR once a second (a
    watch) and steps per minute (a phone): the realistic mixed input (issue 12), sorted by
    time as an export of several devices would be."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mixed.parquet"
    if path.exists():
        return [path]
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    parts = []
    for u in range(users):
        n = int(days * 86400 / 0.9)
        night = lambda t: ((t / 3600.0) % 24 < 7).astype(np.float64)  # noqa: E731
        ar = lfilter([np.sqrt(1 - 0.25)], [1.0, -0.5], rng.standard_normal(n))
        t_guess = np.arange(n) * 0.9
        rr = 880.0 + 120.0 * night(t_guess) + 35.0 * ar
        t_ns = np.cumsum(rr * 1e6).astype(np.int64)
        keep = t_ns < days * 86400 * NS
        rr, t_ns = rr[keep], t_ns[keep]
        sec = np.arange(days * 86400, dtype=np.int64)
        hr = np.round(np.interp(sec * NS, t_ns, 60000.0 / rr))
        minute = np.arange(60, days * 86400, 60, dtype=np.int64)
        steps = rng.poisson(np.where(night(minute.astype(float)) > 0, 0.0, 4.0))
        name = f"user{u:05d}"
        for metric, tt, v, src in (("rr_ms", t_ns, np.round(rr, 1), "sim/strap"), ("hr_bpm", sec * NS, hr, "sim/watch"), ("steps", minute * NS, steps.astype(float), "sim/phone")):
            parts.append(pl.DataFrame({"user": name, "time": T0 + tt, "metric": metric, "value": v, "source": src}))
    frame = pl.concat(parts).sort("time").with_columns(pl.col("time").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"))
    frame.write_parquet(path)
    return [path]


NS = 1_000_000_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "stresswatch-bench-replay")
    ap.add_argument("--mixed", action="store_true", help="one file: RR, 1 Hz HR and steps per minute for the same people")
    ap.add_argument("--part-rows", type=int, default=None, help="rows read at a time from a file in time order (default: the product's)")
    args = ap.parse_args()
    from stresswatch import replay
    from stresswatch.config import Settings
    from stresswatch.replay import PART_ROWS

    data = args.data / f"{args.users}x{args.days}{'-mixed' if args.mixed else ''}"
    t = time.perf_counter()
    paths = generate_mixed(data, args.users, args.days) if args.mixed else generate(data, args.users, args.days)
    gen_s = time.perf_counter() - t

    out = Path(tempfile.mkdtemp(prefix="stresswatch-bench-out-"))
    part_rows = args.part_rows or PART_ROWS
    load_before = os.getloadavg()
    t, cpu = time.perf_counter(), time.process_time()
    result = replay(paths, out=out, settings=Settings(), part_rows=part_rows)
    total_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reference below
    load_after = os.getloadavg()
    phases = result.timings

    t = time.perf_counter()
    ref = pl.concat([pl.read_parquet(p) for p in paths])
    ref_s = time.perf_counter() - t
    beats = ref.height
    del ref
    user_days = args.users * args.days
    shutil.rmtree(out)
    print(f"date {date.today()}  machine {platform.machine()} {os.cpu_count()} cores  python {platform.python_version()}  polars {pl.__version__}  POLARS_MAX_THREADS={os.environ.get('POLARS_MAX_THREADS', 'unset')}")
    print(f"cohort: {args.users} users x {args.days} days = {user_days} user-days, {beats:,} rows{' (RR, 1 Hz HR, steps/min; one file)' if args.mixed else ' (beats)'} ({gen_s:.1f} s to generate or find)")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"part rows {part_rows:,}{'' if part_rows == PART_ROWS else ' (NOT the product default ' + format(PART_ROWS, ',') + ')'}")
    print(f"replay end to end: {total_s:.1f} s = {user_days / total_s:,.1f} user-days/s = {beats / total_s:,.0f} beats/s; CPU {cpu_s:.1f} s = {user_days / cpu_s:,.1f} user-days per CPU-second")
    gen_note = "  (includes generating the data in this process: run again for the replay's own)" if gen_s > 1.0 else ""
    print(f"peak RSS {rss_mb:,.0f} MB{gen_note}")
    for name, secs in phases.items():
        print(f"  {name:<10} {secs:7.2f} s  ({100 * secs / total_s:4.1f} %)")
    print(f"reference: bare polars.read_parquet of the same files {ref_s:.2f} s")
    print(f"windows {result.windows.height:,}, alerts {result.alerts.height}")


if __name__ == "__main__":
    main()
