"""Evaluate the detector on the named scenario family, over evaluation seeds, in one command.

    python benchmarks/evaluate_detector.py                      # 5 evaluation seeds, all scenarios, curve
    python benchmarks/evaluate_detector.py --seeds 9001 --no-curve   # quick look
    python benchmarks/evaluate_detector.py --tune --set score_enter=2.0   # tuning seeds only
    python benchmarks/evaluate_detector.py --json after.json --compare "before.json=previous"   # overlay another run

Scenarios, sources and seeds: ``fixtures/scenarios.py`` (tuning and evaluation seeds are kept
apart there; ``--tune`` may only use tuning seeds and an evaluation never uses them). For
every seed and scenario the simulator makes one person per source; the detector runs over
each scenario's people in one batch pass (identical to streaming, tests/test_detector.py)
with the defaults and with each value of the main threshold (``--curve``); alerts are
scored with ``stresswatch.evaluate.evaluate`` from the end of the warm-up on.

Printed: per scenario and per source, recall and false alerts per calm user-day (mean and
SD over seeds), median and p90 delay (over all detected episodes of the seeds); a
scenario x source grid; the issue's targets. Written: the trade-off curve (recall against
false alerts per calm user-day, per source group, over the main threshold) as a PNG, and
all raw counts as JSON (``--json``) so another detector's run can be overlaid
(``--compare``). ``STRESSWATCH_EVAL_CACHE=DIR`` keeps the simulated cohorts between runs. The script only uses ``Detector``, ``DetectorSettings`` and ``evaluate``,
so it can score an earlier version of the package on the same seeds (put that version's
``src`` first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.evaluate import alerts_frame, evaluate
from stresswatch_fixtures import scenarios as sc
from stresswatch_fixtures.cohort import simulate

DAY_NS = 86400 * 1_000_000_000
HERE = Path(__file__).resolve().parent
GROUPS = {"motion": ("steps", "optical"), "strap": ("strap",), "hr_minute": ("hr_minute",)}
TARGETS = [
    ("recall, both signals, >= 20 min", ">= 0.95"),
    ("recall, HRV down only", ">= 0.8"),
    ("recall, HR up only", ">= 0.8"),
    ("recall, half size", "report"),
    ("false alerts / calm user-day, with motion data", "<= 0.1"),
    ("false alerts / calm user-day, strap only", "<= 0.25"),
    ("false alerts / calm user-day, HR-only", "<= 0.3"),
    ("median delay, min (both, >= 20 min)", "<= 8"),
]


def run_one(name: str, seed: int, settings_list: list[DetectorSettings], users_per_source: int, days: int | None) -> list[dict]:
    """Raw counts per person for each settings: episodes, detected, delays, calm days, false alerts."""
    spec = sc.spec(name, seed, users_per_source, days)
    cache = Path(os.environ["STRESSWATCH_EVAL_CACHE"]) if os.environ.get("STRESSWATCH_EVAL_CACHE") else None
    stem = f"{name}-{seed}-{users_per_source}-{spec.days}"
    if cache and (cache / f"{stem}.parquet").exists():
        samples, labels = pl.read_parquet(cache / f"{stem}.parquet"), pl.read_parquet(cache / f"{stem}.labels.parquet")
    else:
        samples, labels = simulate(spec)
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            samples.write_parquet(cache / f"{stem}.parquet")
            labels.write_parquet(cache / f"{stem}.labels.parquet")
    source = dict(samples.group_by("user").agg(pl.col("source").first().str.replace("sim/", "")).iter_rows())
    begin = spec.start + timedelta(days=spec.warmup_days)
    end = spec.start + timedelta(days=spec.days)
    users = sorted(source)
    observed = pl.DataFrame({"user": users}).with_columns(pl.lit(begin).alias("start"), pl.lit(end).alias("end"))
    stress = labels.filter(pl.col("kind") == "stress")
    b_ns = int(begin.timestamp()) * 1_000_000_000
    days_obs = np.arange(b_ns // DAY_NS, int(end.timestamp()) * 1_000_000_000 // DAY_NS)
    out = []
    # A traveller's phone reports the new time zone on arrival: the detector is told then
    # (where it has the seam), so the samples are fed in time order around those moments.
    moves = labels.filter(pl.col("kind").str.starts_with("travel")).sort("start")
    for k, s in enumerate(settings_list):
        d = Detector(s)
        raised = []
        t_prev = None
        for m in moves.iter_rows(named=True) if hasattr(d, "set_timezone") else []:
            part = samples.filter((pl.col("time") < m["start"]) & ((pl.col("time") >= t_prev) if t_prev is not None else True))
            raised += d.update(part).alerts
            hours = int(m["kind"].removeprefix("travel"))
            d.set_timezone(m["user"], f"Etc/GMT{-hours:+d}")  # POSIX sign: Etc/GMT-6 is UTC+6
            t_prev = m["start"]
        rest = samples.filter(pl.col("time") >= t_prev) if t_prev is not None else samples
        raised += d.update(rest).alerts
        alerts = alerts_frame(raised + d.flush().alerts)
        ev = evaluate(alerts, labels, observed)
        for u in users:
            ep = ev.episodes.filter(pl.col("user") == u)
            st = stress.filter(pl.col("user") == u)
            busy = set()
            for a, b in zip(st["start"].dt.epoch("ns"), st["end"].dt.epoch("ns")):
                busy.update(range(a // DAY_NS, b // DAY_NS + 1))
            calm = [x for x in days_obs.tolist() if x not in busy]
            fa = ev.alerts.filter((pl.col("user") == u) & ~pl.col("matched"))
            fa_days = (fa["raised_at"].dt.epoch("ns") // DAY_NS).to_list()
            out.append({
                "k": k, "seed": seed, "scenario": name, "source": source[u], "user": u,
                "episodes": ep.height, "detected": int(ep["detected"].sum()),
                "delays_s": [float(x) for x in ep["delay_s"].drop_nulls()],
                "calm_days": len(calm), "calm_false": sum(1 for x in fa_days if x in calm),
                "false": fa.height, "days": len(days_obs),
            })
    return out


def _agg(rows: list[dict]) -> dict:
    """Mean and SD over seeds of recall and false alerts per calm day; delays pooled."""
    seeds = sorted({r["seed"] for r in rows})
    rec, fa = [], []
    for s in seeds:
        rs = [r for r in rows if r["seed"] == s]
        e, d = sum(r["episodes"] for r in rs), sum(r["detected"] for r in rs)
        c, f = sum(r["calm_days"] for r in rs), sum(r["calm_false"] for r in rs)
        if e:
            rec.append(d / e)
        if c:
            fa.append(f / c)
    delays = np.array([x for r in rows for x in r["delays_s"]]) / 60.0
    nan = float("nan")
    return {
        "episodes": sum(r["episodes"] for r in rows),
        "calm_days": sum(r["calm_days"] for r in rows),
        "recall": float(np.mean(rec)) if rec else nan,
        "recall_sd": float(np.std(rec)) if rec else nan,
        "fa": float(np.mean(fa)) if fa else nan,
        "fa_sd": float(np.std(fa)) if fa else nan,
        "median_min": float(np.median(delays)) if len(delays) else nan,
        "p90_min": float(np.quantile(delays, 0.9, method="nearest")) if len(delays) else nan,
    }


def _fmt(a: dict) -> str:
    return (f"{a['episodes']} | {a['recall']:.2f} ± {a['recall_sd']:.2f} | {a['calm_days']} | {a['fa']:.2f} ± {a['fa_sd']:.2f} | "
            f"{a['median_min']:.1f} | {a['p90_min']:.1f}")


def tables(rows: list[dict]) -> str:
    lines = []
    head = "| {} | episodes | recall (mean ± SD over seeds) | calm user-days | false alerts / calm user-day | median delay min | p90 delay min |\n|---|---|---|---|---|---|---|"
    lines.append(head.format("scenario"))
    for name in sc.SCENARIOS:
        rs = [r for r in rows if r["scenario"] == name]
        if rs:
            lines.append(f"| {name} | {_fmt(_agg(rs))} |")
    lines.append("\n" + head.format("source"))
    for src in sc.SOURCES:
        rs = [r for r in rows if r["source"] == src]
        if rs:
            lines.append(f"| {src} | {_fmt(_agg(rs))} |")
    lines.append("\nrecall by scenario x source (mean over seeds); last row: false alerts per calm user-day\n")
    lines.append("| scenario | " + " | ".join(sc.SOURCES) + " |\n|---|" + "---|" * len(sc.SOURCES))
    for name in sc.SCENARIOS:
        if name == "calm":
            continue
        cells = [_agg([r for r in rows if r["scenario"] == name and r["source"] == s])["recall"] for s in sc.SOURCES]
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    cells = [_agg([r for r in rows if r["source"] == s])["fa"] for s in sc.SOURCES]
    lines.append("| false alerts / calm day | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def target_values(rows: list[dict]) -> list[float]:
    pick = lambda **kw: [r for r in rows if all(r[k] in v for k, v in kw.items())]  # noqa: E731
    long_both = pick(scenario=("both", "mid_20", "long_60"))
    return [
        _agg(long_both)["recall"],
        _agg(pick(scenario=("hrv_only",)))["recall"],
        _agg(pick(scenario=("hr_only",)))["recall"],
        _agg(pick(scenario=("half",)))["recall"],
        _agg(pick(source=GROUPS["motion"]))["fa"],
        _agg(pick(source=GROUPS["strap"]))["fa"],
        _agg(pick(source=GROUPS["hr_minute"]))["fa"],
        _agg(long_both)["median_min"],
    ]


def curve_points(rows: list[dict], values: list[float]) -> dict[str, list[tuple[float, float, float]]]:
    """Per source group: (threshold, false alerts per calm day, recall over every episode scenario)."""
    out = {}
    for g, srcs in GROUPS.items():
        pts = []
        for k, v in enumerate(values):
            a = _agg([r for r in rows if r["k"] == k + 1 and r["source"] in srcs])
            pts.append((v, a["fa"], a["recall"]))
        out[g] = pts
    return out


def plot(path: Path, curves: dict[str, dict], defaults: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GROUPS), figsize=(5 * len(GROUPS), 4.2), sharey=True)
    for ax, g in zip(axes, GROUPS):
        for label, style in zip(curves, ("o-", "s--", "^:")):
            pts = curves[label].get(g, [])
            if pts:
                ax.plot([p[1] for p in pts], [p[2] for p in pts], style, label=label)
                for v, x, y in pts:
                    ax.annotate(f"{v:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
            dv = defaults.get(label, {}).get(g)
            if dv:
                ax.plot([dv[0]], [dv[1]], "k*", ms=10)
        ax.axvline({"motion": 0.1, "strap": 0.25, "hr_minute": 0.3}[g], color="grey", lw=0.8, ls=":")
        ax.set_title(f"{g}: {', '.join(GROUPS[g])}")
        ax.set_xlabel("false alerts per calm user-day")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (all episode scenarios)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Trade-off over the main threshold (numbers: threshold; star: defaults; dotted: target)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", action="store_true", help="use tuning seeds (never evaluation seeds)")
    ap.add_argument("--seeds", type=int, nargs="*", help="a subset of the purpose's seeds")
    ap.add_argument("--scenarios", default=",".join(sc.SCENARIOS))
    ap.add_argument("--users-per-source", type=int, default=1)
    ap.add_argument("--days", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="detector setting override")
    ap.add_argument("--curve-key", default="cusum_h" if "cusum_h" in DetectorSettings.model_fields else "score_enter")
    ap.add_argument("--curve", default="1.0,1.5,2.0,2.5,3.0,4.0", help="values of --curve-key for the trade-off curve")
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--label", default="this version")
    ap.add_argument("--json", type=Path, help="write raw counts here")
    ap.add_argument("--compare", nargs="*", default=[], metavar="JSON[=LABEL]", help="JSON of other runs to overlay in the PNG (LABEL replaces the stored one)")
    ap.add_argument("--png", type=Path, default=HERE / "detector_curve.png")
    ap.add_argument("--from-json", type=Path, help="print and plot a stored run (--json) instead of running")
    a = ap.parse_args()
    if a.from_json:
        z = json.loads(a.from_json.read_text())
        report(z["rows"], z["values"], z["curve_key"], z["label"], None, a)
        return
    seeds = sc.seeds("tune" if a.tune else "evaluate", tuple(a.seeds) if a.seeds else None)
    names = [x for x in a.scenarios.split(",") if x]
    over = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        over[k] = type(DetectorSettings.model_fields[k].default)(v)
    base = DetectorSettings(**over)
    values = [] if a.no_curve else [float(x) for x in a.curve.split(",")]
    settings_list = [base]
    for v in values:
        extra = {a.curve_key: v}
        if a.curve_key == "score_enter" and "score_exit" in DetectorSettings.model_fields:
            extra["score_exit"] = min(base.score_exit, v)
        settings_list.append(DetectorSettings(**{**base.model_dump(), **extra}))
    t0 = time.perf_counter()
    rows: list[dict] = []
    for seed in seeds:
        for name in names:
            rows += run_one(name, seed, settings_list, a.users_per_source, a.days)
        print(f"  seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    elapsed = time.perf_counter() - t0
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\n{a.label}: seeds {list(seeds)} ({'tuning' if a.tune else 'evaluation'}), scenarios {len(names)}, "
          f"{a.users_per_source} person per source, overrides {over or 'none'}; {elapsed:.0f} s; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {load}\n")
    report(rows, values, a.curve_key, a.label, a.json, a)


def report(rows: list[dict], values: list[float], curve_key: str, label: str, json_out: Path | None, a: argparse.Namespace) -> None:
    default_rows = [r for r in rows if r["k"] == 0]
    print(tables(default_rows))
    print("\n| target | value | goal |\n|---|---|---|")
    for (what, goal), v in zip(TARGETS, target_values(default_rows)):
        print(f"| {what} | {v:.2f} | {goal} |")
    curves, defaults = {}, {}
    if values:
        curves[label] = curve_points(rows, values)
        print(f"\ntrade-off over {curve_key} (recall over every episode scenario; false alerts per calm user-day):\n")
        print(f"| {curve_key} | " + " | ".join(f"{g} recall | {g} false/day" for g in GROUPS) + " |")
        print("|---|" + "---|---|" * len(GROUPS))
        for k, v in enumerate(values):
            print(f"| {v:g} | " + " | ".join(f"{curves[label][g][k][2]:.2f} | {curves[label][g][k][1]:.2f}" for g in GROUPS) + " |")
    defaults[label] = {g: (_agg([r for r in default_rows if r["source"] in s])["fa"], _agg([r for r in default_rows if r["source"] in s])["recall"]) for g, s in GROUPS.items()}
    if json_out:
        json_out.write_text(json.dumps({"label": label, "values": values, "curve_key": curve_key, "rows": rows}))
    for other in a.compare:
        path, _, name = other.partition("=")
        z = json.loads(Path(path).read_text())
        z["label"] = name or z["label"]
        if z["values"]:
            curves[z["label"]] = curve_points(z["rows"], z["values"])
        d0 = [r for r in z["rows"] if r["k"] == 0]
        defaults[z["label"]] = {g: (_agg([r for r in d0 if r["source"] in s])["fa"], _agg([r for r in d0 if r["source"] in s])["recall"]) for g, s in GROUPS.items()}
    if curves:
        plot(a.png, curves, defaults)
        print(f"\ncurve: {a.png}")


if __name__ == "__main__":
    main()
