"""Evidence combination, per-person time zones and the optical fallback of the detector."""

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest

from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.detect.detector import evidence_score
from stresswatch.errors import ConfigError
from stresswatch.model import Reason

SMALL = DetectorSettings(window_s=60, baseline_windows=60, baseline_min_windows=30, baseline_refresh_s=600, exit_windows=2, cooldown_s=600)
T0 = int(datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp() * 1e9)


def person(user: str, hr_factor: float, noise_factor: float, seed: int = 3) -> pl.DataFrame:
    """2 hours of beats; from 90 to 105 min HR x hr_factor and beat-to-beat noise x noise_factor."""
    rng = np.random.default_rng(seed)
    n = 9000
    t = np.arange(n) * 0.8
    hot = (t >= 5400) & (t < 6300)
    rr = np.where(hot, 800 / hr_factor, 800) + np.where(hot, 30 * noise_factor, 30) * rng.standard_normal(n)
    t = np.cumsum(rr) / 1000.0
    keep = t < 7200
    return pl.DataFrame(
        {"user": user, "time": T0 + (t[keep] * 1e9).astype(np.int64), "metric": "rr_ms", "value": rr[keep], "source": "t"}
    ).with_columns(pl.col("time").cast(pl.Datetime("ns", "UTC")))


def alerts_of(frame: pl.DataFrame, s: DetectorSettings = SMALL, **kw):
    d = Detector(s, **kw)
    a = d.update(frame)
    b = d.flush()
    return pl.concat([a.windows, b.windows]), a.alerts + b.alerts


def test_one_signal_alone_decides_and_the_reasons_say_which():
    _, hrv = alerts_of(person("hrv", 1.0, 0.3))
    _, hr = alerts_of(person("hr", 1.2, 1.0))
    assert [a.reasons for a in hrv] == [(Reason.HRV_BELOW_BASELINE,)]
    assert [a.reasons for a in hr] == [(Reason.HR_ABOVE_BASELINE,)]


def test_both_signals_together_decide_no_later_than_either_alone():
    _, both = alerts_of(person("x", 1.1, 0.6))
    _, hr = alerts_of(person("x", 1.1, 1.0))
    _, hrv = alerts_of(person("x", 1.0, 0.6))
    assert len(both) == 1 and set(both[0].reasons) == {Reason.HRV_BELOW_BASELINE, Reason.HR_ABOVE_BASELINE}
    for single in (hr, hrv):
        assert all(both[0].raised_at <= a.raised_at for a in single)


def test_evidence_score_is_the_strongest_direction():
    z_hr = np.array([3.0, 0.0, 2.0, 1.0])
    z_ln = np.array([0.0, -3.0, -2.0, np.nan])
    score, direction = evidence_score(z_hr, z_ln, np.array([0.0, 0.0, -0.5, 0.0]))
    assert score[:2] == pytest.approx([3.0, 3.0])
    assert score[2] == pytest.approx(4.0 / np.sqrt(3.0))  # both: (z_hr - z_ln) / sqrt(2 (1 - rho))
    assert score[3] == 1.0  # no HRV: HR alone
    assert direction.tolist() == [1, 2, 0, 1]


def test_time_of_day_slots_follow_the_persons_time_zone():
    frame = person("ny", 1.0, 1.0).filter(pl.col("time") < pl.lit(datetime(2026, 3, 2, 0, 30, tzinfo=timezone.utc)))
    s = DetectorSettings(window_s=300, baseline_slots=4)
    utc, _ = alerts_of(frame, s)
    ny, _ = alerts_of(frame, s, timezones={"ny": "America/New_York"})
    assert set(utc["baseline_slot"]) == {0}  # 00:00-00:30 UTC
    assert set(ny["baseline_slot"]) == {3}  # 19:00-19:30 in New York (UTC-5 in March before DST)
    d = Detector(s)
    d.set_timezone("ny", "America/New_York")
    d.update(frame)
    restored = Detector.from_bytes(d.to_bytes(), s)
    assert set(restored.flush().windows["baseline_slot"]) == {3}
    # Only the project's own error for any name: a folder of the zone database ("America") and an
    # over-long name make ZoneInfo raise OSError, which must not escape to the engine.
    for bad in ("Mars/Olympus_Mons", "America", "x" * 300, "../etc/passwd"):
        with pytest.raises(ConfigError):
            d.set_timezone("ny", bad)


def test_gappy_beats_give_way_to_the_watchs_own_heart_rate_readings():
    """An optical watch: beats for 1 minute in 5, HR readings every second."""
    t = np.arange(0, 600, 1.0)
    hr = pl.DataFrame({"user": "w", "time": T0 + (t * 1e9).astype(np.int64), "metric": "hr_bpm", "value": 70.0, "source": "t"})
    bt = np.arange(0, 600, 0.85)
    bt = bt[(bt % 300) < 60]
    rr = pl.DataFrame({"user": "w", "time": T0 + (bt * 1e9).astype(np.int64), "metric": "rr_ms", "value": 850.0, "source": "t"})
    frame = pl.concat([hr, rr]).with_columns(pl.col("time").cast(pl.Datetime("ns", "UTC"))).sort("time")
    windows, _ = alerts_of(frame, DetectorSettings())
    assert windows["signal"].to_list() == ["hr_only", "hr_only"]
    assert windows["coverage"].to_list() == [1.0, 1.0]
    assert windows["hr_mean"].to_list() == [70.0, 70.0]
