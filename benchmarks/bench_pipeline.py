"""Whole-detector batch throughput on the bundled demo cohort (4 users x 2 days; quick check).

The detector issue's figures come from ``bench_detector.py`` (larger cohort, streaming tick)
and ``bench_features_vs_neurokit.py``; this one stays as a small, fast smoke benchmark.

    python benchmarks/bench_pipeline.py [--repeat 3]

Prints beats/s for window features alone and for the whole detector (features, baseline,
episodes), best of --repeat runs, one core. The reference in the same run is a plain
polars group-by computing the same per-window RMSSD, so machine speed cancels out.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import numpy as np
import polars as pl

from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.detect.features import window_features
from stresswatch.replay import read_samples
from stresswatch_fixtures import path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def polars_reference(samples: pl.DataFrame) -> pl.DataFrame:
    return (
        samples.filter(pl.col("metric") == "rr_ms")
        .group_by("user", pl.col("time").dt.truncate("5m"), maintain_order=True)
        .agg((pl.col("value").diff().pow(2).mean().sqrt()).alias("rmssd"))
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    samples = read_samples([path("demo_cohort.parquet")])
    beats = int((samples["metric"] == "rr_ms").sum())
    s = DetectorSettings()

    def whole() -> None:
        d = Detector(s)
        d.update(samples)
        d.flush()

    t_feat = best(lambda: window_features(samples, s), args.repeat)
    t_det = best(whole, args.repeat)
    t_ref = best(lambda: polars_reference(samples), args.repeat)
    print(f"date {date.today()}  machine {platform.machine()} {platform.processor() or ''} python {platform.python_version()} numpy {np.__version__} polars {pl.__version__}")
    print(f"{samples.height:,} samples, {beats:,} beats, 4 users, 2 days")
    print(f"window_features        {beats / t_feat:12,.0f} beats/s  ({t_feat * 1e3:.0f} ms)")
    print(f"whole detector (batch) {beats / t_det:12,.0f} beats/s  ({t_det * 1e3:.0f} ms)")
    print(f"reference: polars group-by RMSSD only {beats / t_ref:12,.0f} beats/s  ({t_ref * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
