"""Detector: alerts on the demo cohort, streaming equals batch, save/restore."""

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.model import SAMPLES_SCHEMA, Reason
from stresswatch.replay import read_samples, time_batches

SMALL = DetectorSettings(window_s=60, baseline_windows=60, baseline_min_windows=30, baseline_refresh_s=600, sustain_windows=3, exit_windows=2, cooldown_s=600)
T0 = int(datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp() * 1e9)


def synthetic(seed: int = 3) -> pl.DataFrame:
    """Two people, 2 hours of beats; 'a' has a 15-minute episode (HR +20 %, RMSSD -60 %) at 90 min."""
    rng = np.random.default_rng(seed)
    frames = []
    for user, episode in (("a", True), ("b", False)):
        n = 9000
        t = np.arange(n) * 0.8
        hot = episode & (t >= 5400) & (t < 6300)
        rr = np.where(hot, 800 / 1.2, 800) + np.where(hot, 12, 30) * rng.standard_normal(n)
        t = np.cumsum(rr) / 1000.0
        keep = t < 7200
        frames.append(
            pl.DataFrame(
                {"user": user, "time": T0 + (t[keep] * 1e9).astype(np.int64), "metric": "rr_ms", "value": rr[keep], "source": "t"}
            )
        )
    return pl.concat(frames).with_columns(pl.col("time").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC")).sort("time", "user")


SYN = synthetic()


def batch_pass(frame: pl.DataFrame, s: DetectorSettings = SMALL):
    d = Detector(s)
    a = d.update(frame)
    b = d.flush()
    return pl.concat([a.windows, b.windows]).sort("user", "window_start"), a.alerts + b.alerts


def test_synthetic_episode_raises_one_alert_with_reasons():
    windows, alerts = batch_pass(SYN)
    assert [a.user for a in alerts] == ["a"]
    al = alerts[0]
    assert set(al.reasons) == {Reason.HRV_BELOW_BASELINE, Reason.HR_ABOVE_BASELINE}
    assert datetime(2026, 3, 2, 1, 30, tzinfo=timezone.utc) <= al.episode_start < al.raised_at
    # sustained evidence: raised no earlier than `sustain_windows` windows into the episode
    assert (al.raised_at - al.episode_start).total_seconds() >= SMALL.sustain_windows * SMALL.window_s
    assert (windows.filter(pl.col("user") == "b")["state"] != "elevated").all()
    assert windows.filter(pl.col("user") == "a")["state"].head(SMALL.baseline_min_windows).eq("calibrating").all()


def test_no_alert_while_calibrating():
    s = DetectorSettings(**{**SMALL.model_dump(), "baseline_min_windows": 60})  # a full hour of calibration
    windows, alerts = batch_pass(SYN.filter(pl.col("time") < pl.lit(datetime(2026, 3, 2, 1, 0, tzinfo=timezone.utc))), s)
    assert alerts == []
    assert set(windows["state"]) <= {"calibrating", "insufficient_data"}


def test_demo_cohort_alerts_exactly_the_two_stressed_people(demo_cohort):
    samples = read_samples([demo_cohort])
    d = Detector()
    alerts = []
    for b in time_batches(samples):
        alerts += d.update(b).alerts
    alerts += d.flush().alerts
    assert sorted(a.user for a in alerts) == ["alice", "carol"]
    labels = pl.read_csv(demo_cohort.with_name("demo_cohort_labels.csv"), try_parse_dates=True)
    for a in alerts:
        lab = labels.filter(pl.col("user") == a.user).row(0, named=True)
        assert lab["start"] <= a.raised_at <= lab["end"]


@st.composite
def chunkings(draw):
    """Each user's samples cut at arbitrary points, then the users' chunks interleaved arbitrarily."""
    per_user = []
    for user in ("a", "b"):
        part = SYN.filter(pl.col("user") == user)
        cuts = sorted(draw(st.lists(st.integers(0, part.height), max_size=6)))
        bounds = [0, *cuts, part.height]
        per_user.append([part[lo:hi] for lo, hi in zip(bounds, bounds[1:]) if hi > lo])
    order = draw(st.permutations([i for i, chunks in enumerate(per_user) for _ in chunks]))
    pos = [0, 0]
    out = []
    for i in order:
        out.append(per_user[i][pos[i]])
        pos[i] += 1
    return out


BATCH_WINDOWS, BATCH_ALERTS = batch_pass(SYN)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunkings())
def test_streaming_equals_batch_for_any_chunking_and_interleaving(chunks):
    d = Detector(SMALL)
    windows, alerts = [], []
    for c in chunks:
        out = d.update(c)
        windows.append(out.windows)
        alerts += out.alerts
    out = d.flush()
    windows.append(out.windows)
    alerts += out.alerts
    got = pl.concat(windows).sort("user", "window_start")
    assert got.equals(BATCH_WINDOWS)
    assert sorted(alerts, key=lambda a: a.alert_id) == sorted(BATCH_ALERTS, key=lambda a: a.alert_id)


@pytest.mark.parametrize("cut", [1000, 7000, 12000])
def test_save_and_restore_gives_identical_results(cut):
    d = Detector(SMALL)
    first = d.update(SYN[:cut])
    restored = Detector.from_bytes(d.to_bytes(), SMALL)
    second = restored.update(SYN[cut:])
    last = restored.flush()
    got = pl.concat([first.windows, second.windows, last.windows]).sort("user", "window_start")
    assert got.equals(BATCH_WINDOWS)
    assert first.alerts + second.alerts + last.alerts == BATCH_ALERTS


def test_late_samples_are_dropped_and_counted():
    d = Detector(SMALL)
    d.update(SYN.filter(pl.col("user") == "a")[:3000])
    late = SYN.filter(pl.col("user") == "a")[:10].select(list(SAMPLES_SCHEMA))
    out = d.update(late)
    assert out.windows.height == 0
    assert d.late_samples == 10
