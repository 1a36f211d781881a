"""Window features against direct, loop-based computation of the documented conventions."""

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.config import DetectorSettings
from stresswatch.detect.features import clean_rr, window_features
from stresswatch_fixtures import path as fixture_path

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)


def rr_samples(user: str, rr: list[float], start: datetime = T0) -> pl.DataFrame:
    t = start + np.cumsum(rr) * timedelta(milliseconds=1)
    return pl.DataFrame(
        {"user": user, "time": list(t), "metric": "rr_ms", "value": rr, "source": "test"},
        schema_overrides={"time": pl.Datetime("ns", "UTC")},
    )


def reference(rr: np.ndarray) -> dict[str, float]:
    d = np.diff(rr)
    return {
        "rmssd_ms": float(np.sqrt(np.mean(d**2))),
        "sdnn_ms": float(np.std(rr, ddof=1)),
        "pnn50": float(np.mean(np.abs(d) > 50)),
        "hr_mean": float(np.mean(60000 / rr)),
    }


def test_features_match_reference_on_clean_beats():
    rng = np.random.default_rng(1)
    rr = np.round(800 + 40 * rng.standard_normal(300) * 0.3, 1)
    f = window_features(rr_samples("a", rr.tolist()), DetectorSettings())
    first = f.row(0, named=True)
    n = first["n_beats"]
    ref = reference(rr[:n])
    for k, v in ref.items():
        assert abs(first[k] - v) <= 1e-9 * max(1.0, abs(v)), k
    assert first["ln_rmssd"] == np.log(first["rmssd_ms"])
    assert 0 < first["coverage"] <= 1


def test_cleaning_removes_out_of_range_and_jumps_and_counts_them():
    rr = [800.0] * 20 + [250.0] + [800.0] * 20 + [1300.0] + [800.0] * 20
    s = DetectorSettings()
    keep = clean_rr(np.zeros(len(rr), np.int64), np.array(rr), s)
    # 250 is out of range; 1300 jumps >20 % from 800, and so does the 800 after it.
    assert not keep[20] and not keep[41] and not keep[42]
    assert keep.sum() == len(rr) - 3
    f = window_features(rr_samples("a", rr), s)
    assert int(f["n_rr_removed"].sum()) == 3
    assert f["rmssd_ms"][0] == 0.0  # every kept beat is 800 ms


def test_windows_are_aligned_to_the_epoch_and_split_by_user():
    a = rr_samples("a", [1000.0] * 400)  # 400 s: spans two 5-min windows
    b = rr_samples("b", [750.0] * 100)
    f = window_features(pl.concat([a, b]), DetectorSettings())
    assert f["user"].to_list() == ["a", "a", "b"]
    assert all(ts.timestamp() % 300 == 0 for ts in f["window_start"].to_list())
    assert f["n_beats"].to_list() == [299, 101, 100]  # beat at t=300 s opens the second window


def test_hr_only_window_uses_hr_samples_and_has_no_hrv():
    times = [T0 + timedelta(seconds=5 * i) for i in range(60)]
    hr = pl.DataFrame(
        {"user": "w", "time": times, "metric": "hr_bpm", "value": [70.0] * 60, "source": "watch"},
        schema_overrides={"time": pl.Datetime("ns", "UTC")},
    )
    row = window_features(hr, DetectorSettings()).row(0, named=True)
    assert row["hr_mean"] == 70.0 and row["n_beats"] == 0
    assert row["rmssd_ms"] is None and row["sdnn_ms"] is None
    assert row["coverage"] == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(200, 2500, allow_nan=False), min_size=0, max_size=400))
def test_features_are_finite_or_missing_for_any_rr(rr):
    samples = rr_samples("a", rr) if rr else rr_samples("a", [800.0])[:0]
    f = window_features(samples, DetectorSettings())
    expected_windows = samples.select((pl.col("time").dt.epoch("s") // 300).n_unique()).item()
    assert f.height == expected_windows
    for col in ("rmssd_ms", "sdnn_ms", "pnn50", "hr_mean", "coverage"):
        vals = f[col].drop_nulls().to_numpy()
        assert np.isfinite(vals).all()
    assert (f["n_beats"] + f["n_rr_removed"]).sum() == len(rr)


def direct_window_features(rr_by_window: list[np.ndarray], s: DetectorSettings) -> list[dict[str, float]]:
    """The documented conventions, written as plainly as possible: one loop per window."""
    out = []
    for rr in rr_by_window:
        kept, prev_in_range = [], None
        removed = 0
        for x in rr:
            if not (s.rr_min_ms <= x <= s.rr_max_ms):
                removed += 1
                continue
            jump = prev_in_range is not None and abs(x - prev_in_range) > s.rr_max_change * prev_in_range
            prev_in_range = x
            if jump:
                removed += 1
            else:
                kept.append(x)
        k = np.array(kept)
        d = np.diff(k)
        out.append(
            {
                "n_beats": len(k),
                "n_rr_removed": removed,
                "hr_mean": float(np.mean(60000.0 / k)),
                "rmssd_ms": float(np.sqrt(np.mean(d**2))),
                "sdnn_ms": float(np.std(k, ddof=1)),
                "pnn50": float(np.sum(np.abs(d) > 50) / len(d)),
            }
        )
    return out


def test_features_equal_direct_reference_on_real_beats_with_artefacts():
    real = np.loadtxt(fixture_path("rr/pyhrv_nsrdb_nni_long.csv"), skiprows=1)
    rng = np.random.default_rng(4)
    rr = real.copy()
    hit = rng.choice(len(rr), 120, replace=False)
    rr[hit] *= rng.choice([0.5, 1.7, 3.0], len(hit))  # extra/missed beats and out-of-range values
    s = DetectorSettings()
    f = window_features(rr_samples("nsr", rr.tolist()), s)
    t = np.cumsum(rr) / 1000.0  # seconds from T0 (midnight, so windows start at multiples of 300 s)
    win = (t // s.window_s).astype(int)
    ref = direct_window_features([rr[win == k] for k in np.unique(win)], s)
    assert f.height == len(ref) == 13
    for row, r in zip(f.iter_rows(named=True), ref):
        for k, v in r.items():
            assert abs(row[k] - v) <= 1e-9 * max(1.0, abs(v)), (k, row[k], v)
    assert f["n_rr_removed"].sum() >= 120
