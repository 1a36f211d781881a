"""Window features versus NeuroKit2 ``hrv_time``: equality and throughput in the same run.

    python benchmarks/bench_features_vs_neurokit.py [--users 4] [--days 2] [--nk-windows 400]

One core (POLARS_MAX_THREADS=1 set below). Data: the seeded cohort (fixtures/cohort.py: real
NN variability, artefacts). Our side: ``window_features`` on the samples frame (cleaning,
windowing and all features, from a polars frame). NeuroKit2 side: for the same windows, the
beats our cleaning *kept* (so both see the same cleaned windows) passed to
``nk.hrv_time({"RRI": kept_ms, "RRI_Time": cumulative_s})``, timed on ``--nk-windows``
windows and compared on RMSSD and SDNN (ddof 1) with relative difference <= 1e-9, and on
pNN50 after converting conventions (we divide by the n-1 differences, NeuroKit2 by n).
Throughput is beats per CPU-second of this process on each side (the machine is shared); NeuroKit2 computes more time-domain indices
per call (its cost per window, not ours, is what a user of it pays).
"""

from __future__ import annotations

import os

os.environ["POLARS_MAX_THREADS"] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from stresswatch.config import DetectorSettings  # noqa: E402
from stresswatch.detect.features import (  # noqa: E402
    BeatCarry,
    Others,
    block_partials,
    combine,
    encode_users,
    prepare_beats,
    split_rows,
    to_columns,
    window_features,
)
from stresswatch_fixtures.cohort import CohortSpec, simulate  # noqa: E402


def main() -> None:
    import neurokit2 as nk

    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--nk-windows", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    s = DetectorSettings()
    samples, _ = simulate(CohortSpec(users=a.users, days=a.days, hr_only_share=0.0))
    samples = samples.filter(pl.col("metric") == "rr_ms")
    beats_total = samples.height

    times = []
    for _ in range(a.repeat):
        t = time.process_time()  # CPU time on both sides: the machine is shared
        ours = window_features(samples, s)
        times.append(time.process_time() - t)
    t_ours = min(times)

    # the kept beats of each window, in order (same cleaning code path as the detector)
    known: dict[str, int] = {}
    u = encode_users(samples.get_column("user"), known)
    beats, _ = split_rows(to_columns(samples, u, s), BeatCarry.empty(len(known)), s)
    block = beats.key[beats.kept]  # user << 32 | epoch minute
    kept_key = ((block >> 32) << 32) | ((block & 0xFFFFFFFF) // (s.window_s // 60))
    kept_rr = beats.rr[beats.kept]
    starts = np.flatnonzero(np.r_[True, kept_key[1:] != kept_key[:-1]])
    ends = np.r_[starts[1:], len(kept_key)]
    names = list(known)
    by_key = {
        (names[int(k >> 32)], int(k & 0xFFFFFFFF)): (lo, hi) for k, lo, hi in zip(kept_key[starts], starts, ends)
    }
    rows = ours.with_columns((pl.col("window_start").dt.epoch("s") // s.window_s).alias("w")).filter(pl.col("n_beats") >= 3)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(rows.height, min(a.nk_windows, rows.height), replace=False))
    sel = rows[pick]
    worst = {"RMSSD": 0.0, "SDNN": 0.0, "pNN50": 0.0}
    nk_beats = 0
    t_nk = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in sel.iter_rows(named=True):
            lo, hi = by_key[(r["user"], r["w"])]
            rr = kept_rr[lo:hi]
            assert len(rr) == r["n_beats"]
            t = time.process_time()
            res = nk.hrv_time({"RRI": rr, "RRI_Time": np.cumsum(rr) / 1000.0})
            t_nk += time.process_time() - t
            nk_beats += len(rr)
            n = len(rr)
            for ours_v, nk_v, name in (
                (r["rmssd_ms"], float(res["HRV_RMSSD"].iloc[0]), "RMSSD"),
                (r["sdnn_ms"], float(res["HRV_SDNN"].iloc[0]), "SDNN"),
                (r["pnn50"] * 100 * (n - 1) / n, float(res["HRV_pNN50"].iloc[0]), "pNN50"),
            ):
                rel = abs(ours_v - nk_v) / max(abs(nk_v), 1e-300) if nk_v != 0 else abs(ours_v)
                worst[name] = max(worst[name], rel)
    # the same computation from arrays already in memory (no polars frame in or out):
    # cleaning + differences, per-minute partials, window combination
    cols = to_columns(samples, u, s)
    kern = []
    for _ in range(a.repeat):
        t = time.process_time()
        b = prepare_beats(cols.key, cols.value, BeatCarry.empty(len(known)), s, cols.block)
        combine(block_partials(b, Others.empty(), s), s)
        kern.append(time.process_time() - t)
    t_kern = min(kern)
    ours_bps = beats_total / t_ours
    nk_bps = nk_beats / t_nk
    print(f"data: cohort {a.users} users x {a.days} days, {beats_total:,} beats, {ours.height:,} windows; neurokit2 {nk.__version__}")
    print(f"equality on {sel.height} windows ({nk_beats:,} kept beats): max relative difference "
          f"RMSSD {worst['RMSSD']:.1e}, SDNN {worst['SDNN']:.1e}, pNN50 (n-1 vs n converted) {worst['pNN50']:.1e} "
          f"-> {'PASS' if max(worst['RMSSD'], worst['SDNN']) <= 1e-9 else 'FAIL'} (<= 1e-9)")
    print(f"ours: window_features {ours_bps:14,.0f} beats/s ({t_ours:.3f} s, all windows, best of {a.repeat})")
    print(f"ours: kernel on arrays {beats_total / t_kern:14,.0f} beats/s ({t_kern:.3f} s: clean + partials + windows, no frames)")
    print(f"neurokit2 hrv_time     {nk_bps:14,.0f} beats/s ({t_nk:.3f} s for {sel.height} windows)")
    print(f"headline ratio, counting our polars frame in and out:    {ours_bps / nk_bps:,.0f}x (target >= 300x)")
    print(f"ratio of the kernel alone (arrays in, as NeuroKit2 gets them): {beats_total / t_kern / nk_bps:,.0f}x")


if __name__ == "__main__":
    main()
