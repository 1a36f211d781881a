"""Frequency-domain HRV (Lomb-Scargle, LF/HF) per window: against the textbook formula
evaluated directly per window, on RR series modulated by a known sinusoid, and in the
window features."""

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings, strategies as st

from stresswatch.config import DetectorSettings
from stresswatch.detect.features import window_features
from stresswatch.detect.spectral import MIN_BEATS, band_power, hrv_frequency, lomb_scargle

NS = 1_000_000_000


def direct_lomb(t: np.ndarray, y: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Floating-mean Lomb-Scargle, 'psd' units, one series, sin/cos of every (f, t) evaluated
    directly (Zechmeister & Kürster 2009, as astropy's reference implementation states it)."""
    y = y - y.mean()
    om = 2 * np.pi * freq[:, None]
    sn, cs = np.sin(om * t), np.cos(om * t)
    s, c = sn.mean(1), cs.mean(1)
    s2 = 2 * (sn * cs).mean(1) - 2 * s * c
    c2 = (cs * cs - sn * sn).mean(1) - (c * c - s * s)
    tau_om = 0.5 * np.arctan2(s2, c2)
    ct, stau = np.cos(om * t - tau_om[:, None]), np.sin(om * t - tau_om[:, None])
    yc = (y * ct).mean(1) - y.mean() * ct.mean(1)
    ys = (y * stau).mean(1) - y.mean() * stau.mean(1)
    cc = (ct * ct).mean(1) - ct.mean(1) ** 2
    ss = (stau * stau).mean(1) - stau.mean(1) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return 0.5 * len(t) * (yc * yc / cc + ys * ys / ss)


# at least 20 beats (8 s) and 0.04 Hz: every window spans 2 rad of phase or more, where the
# periodogram is well conditioned (at a tiny fraction of a cycle both forms lose all digits)
rr_series = st.lists(st.floats(400, 1500), min_size=20, max_size=120)


@settings(max_examples=60, deadline=None)
@given(
    segs=st.lists(rr_series, min_size=1, max_size=6),
    f0=st.floats(0.04, 0.5),
    df=st.floats(1e-3, 2e-2),
    n_freq=st.integers(1, 40),
    offset_s=st.floats(0, 86400),
)
def test_vectorised_periodogram_equals_the_formula_per_window(segs, f0, df, n_freq, offset_s):
    """Many windows at once give each window's own periodogram: no leakage between
    windows, any time origin, any grid."""
    ts, ys = [], []
    for i, rr in enumerate(segs):
        rr = np.array(rr)
        ts.append(offset_s + 1000.0 * i + np.cumsum(rr) / 1000.0)
        ys.append(rr)
    starts = np.cumsum([0] + [len(x) for x in ys])[:-1]
    got = lomb_scargle(np.concatenate(ts), np.concatenate(ys), starts, f0, df, n_freq)
    freq = f0 + df * np.arange(n_freq)
    for i in range(len(segs)):
        want = direct_lomb(ts[i] - ts[i][0], ys[i], freq)
        scale = max(float(np.max(np.abs(want))), 1e-6)
        assert np.all(np.abs(got[i] - want) <= 1e-7 * scale)


@settings(max_examples=40, deadline=None)
@given(rr=st.lists(st.floats(400, 1500), min_size=MIN_BEATS, max_size=200), gain=st.floats(0.1, 10))
def test_band_power_scales_with_the_square_of_the_rr_variation(rr, gain):
    rr = np.array(rr)
    t = np.cumsum(rr) / 1000.0
    y2 = rr.mean() + gain * (rr - rr.mean())
    p1 = lomb_scargle(t, rr, np.array([0]), 0.04, 0.002, 180)
    p2 = lomb_scargle(t, y2, np.array([0]), 0.04, 0.002, 180)
    assert np.allclose(p2, gain * gain * p1, rtol=1e-8, atol=1e-9 * np.nanmax(np.abs(p1)) * gain * gain)


def modulated_rr(freq_hz: float, amp_ms: float, seconds: float = 300.0, mean_ms: float = 850.0) -> tuple[np.ndarray, np.ndarray]:
    """Beats of a heart whose interval follows ``mean + amp · sin(2π f t)`` (t = beat time)."""
    t, out = [0.0], []
    while t[-1] < seconds:
        rr = mean_ms + amp_ms * np.sin(2 * np.pi * freq_hz * t[-1])
        out.append(rr)
        t.append(t[-1] + rr / 1000.0)
    return np.array(t[1:]), np.array(out)


@pytest.mark.parametrize("freq_hz,band", [(0.1, "lf"), (0.25, "hf")])
def test_sinusoid_lands_in_its_band_with_its_variance(freq_hz, band):
    """A 40 ms sinusoidal RR modulation has variance 40²/2 = 800 ms²: all of it in its own
    band, almost none in the other (breathing at 15/min is HF; a 10-s Mayer wave is LF)."""
    t, rr = modulated_rr(freq_hz, 40.0, seconds=299.0)
    spec = hrv_frequency(t, rr, np.array([0]), 300)
    other = "hf" if band == "lf" else "lf"
    assert spec[f"{band}_ms2"][0] == pytest.approx(800.0, rel=0.03)
    assert spec[f"{other}_ms2"][0] < 0.03 * spec[f"{band}_ms2"][0]
    assert (spec["lf_hf"][0] > 30) if band == "lf" else (spec["lf_hf"][0] < 1 / 30)


def test_lf_hf_follows_the_mix_of_two_rhythms():
    """Both rhythms at once: the ratio of band powers is the ratio of their variances."""
    t, _ = modulated_rr(0.1, 0.0, seconds=299.0)
    rr = 850 + 30 * np.sin(2 * np.pi * 0.1 * t) + 15 * np.sin(2 * np.pi * 0.3 * t + 1.0)
    t = np.cumsum(rr) / 1000.0
    spec = hrv_frequency(t, rr, np.array([0]), 300)
    assert spec["lf_hf"][0] == pytest.approx((30**2) / (15**2), rel=0.05)


def test_band_power_integrates_only_inside_the_band():
    power = np.ones((1, 11))  # grid 0.00, 0.05, ..., 0.50 Hz
    assert band_power(power, 0.0, 0.05, (0.1, 0.3))[0] == pytest.approx(0.15)  # 0.10..0.25: 3 steps
    assert np.isnan(band_power(power, 0.0, 0.05, (0.6, 0.7))[0])


def rr_frame(user: str, t0: datetime, t_s: np.ndarray, rr: np.ndarray) -> pl.DataFrame:
    ns = int(t0.timestamp()) * NS + np.round(t_s * NS).astype(np.int64)
    return pl.DataFrame({"user": user, "time": ns, "metric": "rr_ms", "value": rr, "source": "test"}).with_columns(
        pl.col("time").cast(pl.Datetime("ns", "UTC"))
    )


def test_window_features_report_lf_hf_per_window_and_keep_the_other_columns():
    t0 = datetime(2026, 3, 2, 9, tzinfo=timezone.utc)
    t_lf, rr_lf = modulated_rr(0.1, 40.0, seconds=600.0)
    t_hf, rr_hf = modulated_rr(0.25, 40.0, seconds=600.0)
    samples = pl.concat([rr_frame("lf", t0, t_lf, rr_lf), rr_frame("hf", t0, t_hf, rr_hf)])
    s = DetectorSettings()
    plain = window_features(samples, s)
    spec = window_features(samples, s, spectral=True)
    assert spec.drop("lf_ms2", "hf_ms2", "lf_hf").equals(plain)
    full = spec.filter(pl.col("coverage") > 0.95)
    assert full.height == 4
    for row in full.iter_rows(named=True):
        assert (row["lf_hf"] > 10) if row["user"] == "lf" else (row["lf_hf"] < 0.1)
        main = row["lf_ms2"] if row["user"] == "lf" else row["hf_ms2"]
        assert main == pytest.approx(800.0, rel=0.1)


def test_window_without_enough_beats_has_no_spectrum():
    t0 = datetime(2026, 3, 2, 9, tzinfo=timezone.utc)
    rr = np.full(MIN_BEATS - 1, 800.0) + np.arange(MIN_BEATS - 1)
    f = window_features(rr_frame("a", t0, np.cumsum(rr) / 1000.0, rr), DetectorSettings(), spectral=True)
    assert f.height == 1
    assert f["lf_ms2"][0] is None and f["hf_ms2"][0] is None and f["lf_hf"][0] is None
    assert f["rmssd_ms"][0] is not None

