"""Evaluate the detector on the seeded labelled cohort (fixtures/cohort.py) in one command.

    python benchmarks/evaluate_detector.py [--users 12] [--days 7] [--seed N] [--set detector_key=value ...]

Simulates the cohort, runs the detector over it in one batch pass (identical to streaming,
see tests/test_detector.py), scores alerts against the labelled stress episodes from the end
of the warm-up on, and prints the overall table next to the issue's targets, then per user.
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

import polars as pl

from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.evaluate import alerts_frame, evaluate
from stresswatch_fixtures.cohort import CohortSpec, simulate

TARGETS = {
    "recall": ">= 0.9",
    "false_alerts_per_calm_user_day": "<= 0.1",
    "median_delay_s": "<= 600",
}


def run(spec: CohortSpec, settings: DetectorSettings):
    samples, labels = simulate(spec)
    t = time.perf_counter()
    d = Detector(settings)
    out = d.update(samples)
    last = d.flush()
    elapsed = time.perf_counter() - t
    windows = pl.concat([out.windows, last.windows])
    alerts = alerts_frame(out.alerts + last.alerts)
    begin = spec.start + timedelta(days=spec.warmup_days)
    end = spec.start + timedelta(days=spec.days)
    observed = pl.DataFrame({"user": samples.get_column("user").unique().sort()}).with_columns(
        pl.lit(begin).alias("start"), pl.lit(end).alias("end")
    )
    return evaluate(alerts, labels, observed), windows, samples, elapsed, (alerts, labels, observed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--seed", type=int, default=CohortSpec.seed)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="detector setting override")
    a = ap.parse_args()
    over = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        over[k] = type(DetectorSettings.model_fields[k].default)(v)
    settings = DetectorSettings(**over)
    spec = CohortSpec(users=a.users, days=a.days, seed=a.seed)
    ev, windows, samples, elapsed, (alerts, labels, observed) = run(spec, settings)
    beats = int((samples.get_column("metric") == "rr_ms").sum())
    print(f"cohort: {spec.users} users x {spec.days} days, seed {spec.seed}, warm-up {spec.warmup_days} days; "
          f"{samples.height:,} samples ({beats:,} beats); detector {elapsed:.2f} s; settings overrides {over or 'none'}")
    print(f"window states: {dict(windows.group_by('state').len().sort('state').iter_rows())}")
    o = ev.overall
    print("\n| metric | value | target |\n|---|---|---|")
    for k in ("episodes", "detected", "alerts", "false_alerts", "user_days", "recall", "precision", "f1",
              "false_alerts_per_user_day", "false_alerts_per_calm_user_day", "median_delay_s", "p90_delay_s"):
        v = o[k]
        print(f"| {k} | {v:.3f} | {TARGETS.get(k, '')} |" if isinstance(v, float) else f"| {k} | {v} | {TARGETS.get(k, '')} |")
    print("\nby data source (people with motion data, chest strap without, HR-only watch):\n")
    print("| source | people | episodes | recall | precision | false alerts / user-day | on calm days | median delay s |\n|---|---|---|---|---|---|---|---|")
    src = samples.group_by("user").agg(pl.col("source").first())
    for name in ("sim/steps", "sim/strap", "sim/hr_only"):
        people = src.filter(pl.col("source") == name).get_column("user")
        if people.len() == 0:
            continue
        e = evaluate(alerts, labels, observed.filter(pl.col("user").is_in(people.implode()))).overall
        print(f"| {name.removeprefix('sim/')} | {people.len()} | {e['episodes']} | {e['recall']:.2f} | {e['precision']:.2f} | "
              f"{e['false_alerts_per_user_day']:.2f} | {e['false_alerts_per_calm_user_day']:.2f} | {e['median_delay_s']:.0f} |")
    print()
    kinds = samples.group_by("user").agg(pl.col("source").first().str.replace("sim/", "").alias("source"))
    cols = ["user", "source", "episodes", "detected", "alerts", "false_alerts", "recall", "precision", "false_alerts_per_user_day", "median_delay_s"]
    by = ev.by_user.join(kinds, on="user").select(cols).sort("user")
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_formatting="MARKDOWN", float_precision=2, tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True):
        print(by)


if __name__ == "__main__":
    main()
