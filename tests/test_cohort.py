"""The labelled cohort simulator: seeded, schema-valid, with the stated episode effect."""

import numpy as np
import polars as pl

from stresswatch.config import DetectorSettings
from stresswatch.detect.features import window_features
from stresswatch.model import validate_samples
from stresswatch_fixtures.cohort import CohortSpec, simulate

SPEC = CohortSpec(users=3, days=4, seed=11, episodes_per_day=1.5, hr_only_share=0.0, strap_share=0.0)
SAMPLES, LABELS = simulate(SPEC)


def test_same_seed_same_data_and_valid_samples():
    again, labels = simulate(SPEC)
    assert again.equals(SAMPLES) and labels.equals(LABELS)
    assert validate_samples(SAMPLES).height == SAMPLES.height
    other, _ = simulate(CohortSpec(users=3, days=3, seed=12))
    assert not other.equals(SAMPLES)


def test_labels_respect_the_warm_up_and_the_stated_durations():
    stress = LABELS.filter(pl.col("kind") == "stress")
    assert stress.height >= 1
    first_day = SPEC.start.timestamp() + SPEC.warmup_days * 86400
    assert (stress["start"].dt.epoch("s") >= first_day).all()
    minutes = (stress["end"] - stress["start"]).dt.total_seconds() / 60
    assert minutes.min() >= SPEC.episode_min[0] and minutes.max() <= SPEC.episode_min[1]
    assert {"exercise", "walk"} <= set(LABELS["kind"])


def test_episodes_have_the_stated_size_against_the_hour_before():
    """Median over episodes: HR up ~10 %, RMSSD down ~30 % versus calm windows just before
    (loose bounds: spontaneous fluctuations and the ramps blur single episodes)."""
    f = window_features(SAMPLES, DetectorSettings())
    hr_ratio, rmssd_ratio = [], []
    for ep in LABELS.filter(pl.col("kind") == "stress").iter_rows(named=True):
        u = f.filter(pl.col("user") == ep["user"])
        inside = u.filter((pl.col("window_start") >= ep["start"] + pl.duration(minutes=5)) & (pl.col("window_end") <= ep["end"]))
        before = u.filter((pl.col("window_end") <= ep["start"]) & (pl.col("window_start") >= ep["start"] - pl.duration(minutes=60)) & (pl.col("steps") < 30))
        if inside.height and before.height:
            hr_ratio.append(inside["hr_mean"].median() / before["hr_mean"].median())
            rmssd_ratio.append(inside["rmssd_ms"].median() / before["rmssd_ms"].median())
    assert len(hr_ratio) >= 2
    assert 1.03 < np.median(hr_ratio) < 1.2
    assert 0.5 < np.median(rmssd_ratio) < 0.9


def test_sources_and_artefacts_are_present():
    s, _ = simulate(CohortSpec(users=10, days=1, seed=3, warmup_days=1))
    kinds = set(s["source"])
    assert kinds == {"sim/steps", "sim/strap", "sim/hr_only"}
    rr = s.filter(pl.col("metric") == "rr_ms")["value"].to_numpy()
    jumps = np.abs(np.diff(rr)) / rr[:-1] > 0.2
    assert 0.002 < jumps.mean() < 0.05  # artefacts present, but a minority
    assert (s.filter(pl.col("metric") == "hr_bpm")["value"] == 0).any()  # optical sensor not locked
