"""Episode-level evaluation on hand-made alerts and labels (every number checkable by hand)."""

import math
from datetime import datetime, timedelta, timezone

import polars as pl

from stresswatch.evaluate import alerts_frame, evaluate
from stresswatch.model import AlertDecision, AlertLevel

D0 = datetime(2026, 3, 2, tzinfo=timezone.utc)


def at(day: int, h: float) -> datetime:
    return D0 + timedelta(days=day, hours=h)


LABELS = pl.DataFrame(
    {
        "user": ["a", "a", "b", "b"],
        "kind": ["stress", "stress", "stress", "exercise"],
        "start": [at(0, 10), at(1, 15), at(0, 9), at(1, 8)],
        "end": [at(0, 10.5), at(1, 15.5), at(0, 9.5), at(1, 9)],
    }
)
OBSERVED = pl.DataFrame({"user": ["a", "b"], "start": [D0, D0], "end": [at(3, 0), at(3, 0)]})


def alerts(*rows):
    return alerts_frame(
        AlertDecision(alert_id=str(i), user=u, raised_at=t, episode_start=t, level=AlertLevel.ELEVATED, reasons=(), score=2.0)
        for i, (u, t) in enumerate(rows)
    )


def test_recall_precision_false_alerts_and_delay():
    ev = evaluate(
        alerts(
            ("a", at(0, 10.25)),  # detects a's first episode after 15 min
            ("a", at(0, 10.4)),  # a second alert in the same episode: still a true alert
            ("a", at(2, 3)),  # false, on a calm day
            ("b", at(0, 9.5) + timedelta(minutes=10)),  # within the 15-min grace after the end: detects
            ("b", at(1, 8.5)),  # during exercise: false (exercise is not a stress label)
        ),
        LABELS,
        OBSERVED,
    )
    o = ev.overall
    assert (o["episodes"], o["detected"], o["alerts"], o["false_alerts"]) == (3, 2, 5, 2)
    assert math.isclose(o["recall"], 2 / 3) and math.isclose(o["precision"], 3 / 5)
    assert math.isclose(o["f1"], 2 * 0.6 * (2 / 3) / (0.6 + 2 / 3))
    assert math.isclose(o["user_days"], 6.0) and math.isclose(o["false_alerts_per_user_day"], 2 / 6)
    # calm days: a has day 2 (days 0 and 1 hold episodes), b has days 1 and 2 -> 3 calm user-days, 2 false alerts on them
    assert math.isclose(o["false_alerts_per_calm_user_day"], 2 / 3)
    assert sorted(ev.episodes["delay_s"].drop_nulls().to_list()) == [900.0, 2400.0]
    assert o["median_delay_s"] == 1650.0
    by = {r["user"]: r for r in ev.by_user.iter_rows(named=True)}
    assert by["a"]["recall"] == 0.5 and by["b"]["recall"] == 1.0 and by["b"]["false_alerts"] == 1


def test_alerts_outside_the_observed_span_and_late_alerts_do_not_count():
    observed = OBSERVED.with_columns(pl.lit(at(0, 12)).alias("start"))  # warm-up until noon of day 0
    ev = evaluate(alerts(("a", at(0, 10.25)), ("a", at(1, 16.5))), LABELS, observed)
    o = ev.overall
    assert o["episodes"] == 1  # a's episode on day 1 only; day-0 episodes fall in the warm-up
    assert o["alerts"] == 1 and o["detected"] == 0 and o["false_alerts"] == 1  # 16:30 is past end + 15 min
    assert math.isnan(o["median_delay_s"])


def test_no_alerts_at_all():
    o = evaluate(alerts(), LABELS, OBSERVED).overall
    assert o["recall"] == 0.0 and math.isnan(o["precision"]) and o["false_alerts_per_user_day"] == 0.0
