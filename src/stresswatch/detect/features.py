"""Vectorised window features for many users and windows at once (no loop per window).

Input is a samples frame; output one row per (user, window) with the HRV features of
SPEC "windows". Conventions (stated because libraries differ):

* RR cleaning, per window: beats outside ``[rr_min_ms, rr_max_ms]`` are removed, then a beat
  whose RR differs from the previous in-range beat by more than ``rr_max_change`` (relative)
  is removed (successive-difference rule). ``n_rr_removed`` counts both.
* ``rmssd_ms``: root mean square of successive differences of the kept beats.
* ``sdnn_ms``: standard deviation of the kept RR, ddof = 1 (as NeuroKit2 ``hrv_time``).
* ``pnn50``: share of the n-1 successive differences above 50 ms (hrv-analysis, pyhrv;
  NeuroKit2 divides by n instead).
* ``hr_mean``: mean of 60000 / RR over kept beats; from ``hr_bpm`` samples when a window has
  no RR (HR-only sources).
* ``coverage``: sum of kept RR divided by the window length (0..1); for HR-only windows the
  share of minutes holding at least one HR reading.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..config import DetectorSettings
from ..model import Metric

NS = 1_000_000_000

FEATURE_COLUMNS = ("n_beats", "n_rr_removed", "coverage", "hr_mean", "rmssd_ms", "ln_rmssd", "sdnn_ms", "pnn50", "steps")


def _segment_ids(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by ``keys``: segment id of each row, and the first row of each segment."""
    n = len(keys[0])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.zeros(n, bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    return np.cumsum(change) - 1, starts


def clean_rr(
    seg: np.ndarray, rr_ms: np.ndarray, settings: DetectorSettings
) -> np.ndarray:
    """Boolean mask of beats kept, for RR sorted by time within segments ``seg``."""
    in_range = (rr_ms >= settings.rr_min_ms) & (rr_ms <= settings.rr_max_ms)
    keep = in_range.copy()
    idx = np.flatnonzero(in_range)
    if len(idx) > 1:
        prev, cur = idx[:-1], idx[1:]
        same = seg[prev] == seg[cur]
        jump = np.abs(rr_ms[cur] - rr_ms[prev]) > settings.rr_max_change * rr_ms[prev]
        keep[cur[same & jump]] = False
    return keep


def window_features(samples: pl.DataFrame, settings: DetectorSettings) -> pl.DataFrame:
    """One row per (user, window_start) present in ``samples``, sorted by user then time.

    Windows are aligned to multiples of ``window_s`` since the Unix epoch (UTC), so any
    chunking of the input lands beats in the same windows.
    """
    w_ns = settings.window_s * NS
    frame = samples.select(
        "user",
        pl.col("time").dt.epoch("ns").alias("t"),
        "metric",
        "value",
    ).with_columns(((pl.col("t") // w_ns) * w_ns).alias("w"))

    keys = frame.select("user", "w").unique().sort("user", "w")
    out = keys.with_row_index("wid")

    # --- RR features -------------------------------------------------------------------
    rr = frame.filter(pl.col("metric") == Metric.RR_MS.value).sort("user", "w", "t")
    rr = rr.join(out, on=["user", "w"], how="left")
    wid = rr.get_column("wid").to_numpy().astype(np.int64)
    rr_ms = rr.get_column("value").to_numpy().astype(np.float64)
    n_win = out.height
    keep = clean_rr(wid, rr_ms, settings)
    n_raw = np.bincount(wid, minlength=n_win)
    k_wid = wid[keep]
    k_rr = rr_ms[keep]
    n_beats = np.bincount(k_wid, minlength=n_win)
    sum_rr = np.bincount(k_wid, weights=k_rr, minlength=n_win)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rr = sum_rr / n_beats
        hr_rr = np.bincount(k_wid, weights=60000.0 / k_rr, minlength=n_win) / n_beats
        dev = k_rr - mean_rr[k_wid]
        sdnn = np.sqrt(np.bincount(k_wid, weights=dev * dev, minlength=n_win) / (n_beats - 1))
        same = k_wid[1:] == k_wid[:-1]
        d = np.diff(k_rr)[same]
        d_wid = k_wid[1:][same]
        n_diff = np.bincount(d_wid, minlength=n_win)
        rmssd = np.sqrt(np.bincount(d_wid, weights=d * d, minlength=n_win) / n_diff)
        pnn50 = np.bincount(d_wid, weights=(np.abs(d) > 50.0).astype(np.float64), minlength=n_win) / n_diff
        ln_rmssd = np.log(rmssd)
    sdnn[n_beats < 2] = np.nan
    rmssd[n_diff < 1] = np.nan
    pnn50[n_diff < 1] = np.nan
    ln_rmssd[~np.isfinite(ln_rmssd)] = np.nan
    coverage = np.minimum(sum_rr / (settings.window_s * 1000.0), 1.0)

    # --- HR-only and steps ---------------------------------------------------------------
    other = (
        frame.filter(pl.col("metric").is_in([Metric.HR_BPM.value, Metric.STEPS.value]))
        .join(out, on=["user", "w"], how="left")
        .group_by("wid")
        .agg(
            pl.col("value").filter(pl.col("metric") == Metric.HR_BPM.value).mean().alias("hr_samples_mean"),
            pl.col("t").filter(pl.col("metric") == Metric.HR_BPM.value).len().alias("n_hr"),
            ((pl.col("t") - pl.col("w")) // (60 * NS))
            .filter(pl.col("metric") == Metric.HR_BPM.value)
            .n_unique()
            .alias("hr_minutes"),
            pl.col("value").filter(pl.col("metric") == Metric.STEPS.value).sum().alias("steps"),
        )
    )
    out = out.with_columns(
        pl.Series("n_beats", n_beats, pl.Int64),
        pl.Series("n_rr_removed", n_raw - n_beats, pl.Int64),
        pl.Series("coverage", coverage, pl.Float64),
        pl.Series("hr_rr", hr_rr, pl.Float64),
        pl.Series("rmssd_ms", rmssd, pl.Float64),
        pl.Series("ln_rmssd", ln_rmssd, pl.Float64),
        pl.Series("sdnn_ms", sdnn, pl.Float64),
        pl.Series("pnn50", pnn50, pl.Float64),
    ).join(other, on="wid", how="left")
    minutes = settings.window_s / 60.0
    has_rr = pl.col("n_beats") > 0
    hr_ok = pl.col("n_hr").fill_null(0) >= settings.min_hr_samples
    out = out.with_columns(
        pl.when(has_rr).then(pl.col("hr_rr")).when(hr_ok).then(pl.col("hr_samples_mean")).otherwise(None).fill_nan(None).alias("hr_mean"),
        pl.when(has_rr)
        .then(pl.col("coverage"))
        .otherwise((pl.col("hr_minutes").fill_null(0) / minutes).clip(0.0, 1.0))
        .alias("coverage"),
        pl.col("steps").fill_null(0.0),
    )
    return out.select(
        "user",
        pl.col("w").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC").alias("window_start"),
        (pl.col("w") + w_ns).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC").alias("window_end"),
        *(pl.col(c).fill_nan(None) if c not in ("n_beats", "n_rr_removed") else pl.col(c) for c in FEATURE_COLUMNS),
    )
