"""Detection quality guard: a reduced, seeded run of the scenario family (fixtures/scenarios.py).

One seed that is neither a tuning nor an evaluation seed, three scenarios (both signals, HR
up alone, calm; HRV down alone is found too rarely on this seed to set a floor that could
fail, see RESULTS), one person per data source, five days (two of warm-up), at two points of
the trade-off curve: the defaults (false alerts) and a sensitive decision threshold (recall,
delay). Floors and ceilings are this seed's measured values with a
margin of about one episode or one alert; the full evaluation (benchmarks/evaluate_detector.py,
benchmarks/RESULTS.md) judges improvements. A change that moves the detector down or off
its curve, or back to deciding once per window, fails here.
"""

from datetime import timedelta

import polars as pl
import pytest

from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.evaluate import alerts_frame, evaluate
from stresswatch_fixtures import scenarios
from stresswatch_fixtures.cohort import simulate

NAMES = ("both", "hr_only", "calm")
SENSITIVE = DetectorSettings(cusum_h=DetectorSettings().cusum_h / 2)
# measured on TEST_SEED (commit of this test), each with a margin of one episode or one alert:
# recall at SENSITIVE (both 6/10, HR alone 5/14), false alerts per user-day at the
# defaults (motion 5/18, strap 1/9, HR-only export 1/9), median delay at SENSITIVE (25.1 min, 11 episodes)
RECALL_FLOORS = {"both": 0.5, "hr_only": 0.28}
FALSE_CEILINGS = {"motion": 0.34, "strap": 0.23, "hr_minute": 0.23}
DELAY_CEILING_MIN = 30.0


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], tuple[pl.DataFrame, pl.DataFrame]]:
    out = {}
    for name in NAMES:
        spec = scenarios.spec(name, scenarios.TEST_SEED, days=5)
        samples, labels = simulate(spec)
        observed = pl.DataFrame({"user": samples["user"].unique().sort()}).with_columns(
            pl.lit(spec.start + timedelta(days=spec.warmup_days)).alias("start"), pl.lit(spec.start + timedelta(days=spec.days)).alias("end")
        )
        src = samples.group_by("user").agg(pl.col("source").first().str.replace("sim/", ""))
        for point, settings in (("default", DetectorSettings()), ("sensitive", SENSITIVE)):
            d = Detector(settings)
            alerts = d.update(samples).alerts + d.flush().alerts
            ev = evaluate(alerts_frame(alerts), labels, observed)
            out[name, point] = (ev.by_user.join(src, on="user"), ev.episodes)
    return out


def recall(frame: pl.DataFrame) -> float:
    return frame["detected"].sum() / frame["episodes"].sum()


def false_per_day(results, sources: tuple[str, ...]) -> float:
    rows = pl.concat([r.select("source", "false_alerts", "user_days") for (_, p), (r, _) in results.items() if p == "default"])
    rows = rows.filter(pl.col("source").is_in(sources))
    return rows["false_alerts"].sum() / rows["user_days"].sum()


def test_the_seed_is_kept_apart():
    assert scenarios.TEST_SEED not in scenarios.TUNING_SEEDS + scenarios.EVALUATION_SEEDS
    with pytest.raises(scenarios.SeedMisuse):
        scenarios.seeds("tune", (scenarios.EVALUATION_SEEDS[0],))
    with pytest.raises(scenarios.SeedMisuse):
        scenarios.seeds("evaluate", (scenarios.TUNING_SEEDS[0],))


@pytest.mark.parametrize("name", ["both", "hr_only"])
def test_recall_holds_on_the_sensitive_side_of_the_curve(results, name):
    assert recall(results[name, "sensitive"][0]) >= RECALL_FLOORS[name]


@pytest.mark.parametrize("group, sources", [("motion", ("steps", "optical")), ("strap", ("strap",)), ("hr_minute", ("hr_minute",))])
def test_false_alerts_at_the_defaults_stay_below_the_ceiling(results, group, sources):
    assert false_per_day(results, sources) <= FALSE_CEILINGS[group]


def test_episodes_are_decided_no_later_than_measured(results):
    delays = pl.concat([e for (name, p), (_, e) in results.items() if p == "sensitive" and name != "calm"])["delay_s"].drop_nulls()
    assert len(delays) >= 10
    assert delays.median() / 60 <= DELAY_CEILING_MIN
