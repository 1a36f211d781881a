"""Episode-level evaluation of alerts against labelled episodes. Pure functions over frames.

Inputs (polars frames, times ``Datetime`` in UTC):

* ``alerts``: ``user``, ``raised_at`` (other columns ignored); :func:`alerts_frame` builds it
  from :class:`~stresswatch.model.AlertDecision` objects.
* ``labels``: ``user``, ``start``, ``end`` of the true episodes (rows whose ``kind`` column,
  if present, is not ``stress`` are ignored).
* ``observed``: ``user``, ``start``, ``end``: the span evaluated per user (for example after
  the warm-up). Alerts outside it are ignored; it is the denominator of false alerts per
  user-day.

Matching: an alert *detects* an episode when ``start <= raised_at <= end + grace_s`` (a
worker reaching out shortly after the episode still helps; default 15 min). An episode is
detected if any alert detects it; its delay is the first such alert's ``raised_at - start``.
An alert matching no episode is a false alert. Precision = matching alerts / all alerts;
recall = detected episodes / episodes; F1 their harmonic mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from .model import AlertDecision

DAY_S = 86400.0


@dataclass(frozen=True)
class Evaluation:
    overall: dict[str, float]
    by_user: pl.DataFrame  # one row per user with the same metrics
    episodes: pl.DataFrame  # labels with `detected` and `delay_s`
    alerts: pl.DataFrame  # alerts inside the observed span with `matched`


def alerts_frame(alerts: Iterable[AlertDecision]) -> pl.DataFrame:
    rows = [{"user": a.user, "raised_at": a.raised_at, "episode_start": a.episode_start, "score": a.score} for a in alerts]
    schema = {"user": pl.String, "raised_at": pl.Datetime("us", "UTC"), "episode_start": pl.Datetime("us", "UTC"), "score": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _utc(frame: pl.DataFrame, *cols: str) -> pl.DataFrame:
    out = []
    for c in cols:
        dt = frame.schema[c]
        e = pl.col(c)
        if isinstance(dt, pl.Datetime) and dt.time_zone is None:
            e = e.dt.replace_time_zone("UTC")
        out.append(e.dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias(c))
    return frame.with_columns(out)


def _metrics(n_ep: int, n_det: int, n_alerts: int, n_false: int, days: float, calm_days: float, calm_false: int, delays: pl.Series) -> dict[str, float]:
    recall = n_det / n_ep if n_ep else float("nan")
    precision = (n_alerts - n_false) / n_alerts if n_alerts else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if n_ep and n_alerts and precision + recall > 0 else float("nan")
    return {
        "episodes": n_ep,
        "detected": n_det,
        "alerts": n_alerts,
        "false_alerts": n_false,
        "user_days": days,
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "false_alerts_per_user_day": n_false / days if days else float("nan"),
        "false_alerts_per_calm_user_day": calm_false / calm_days if calm_days else float("nan"),
        "median_delay_s": float(delays.median()) if delays.len() else float("nan"),
        "p90_delay_s": float(delays.quantile(0.9, "nearest")) if delays.len() else float("nan"),
    }


def evaluate(alerts: pl.DataFrame, labels: pl.DataFrame, observed: pl.DataFrame, *, grace_s: int = 900) -> Evaluation:
    """Episode recall, precision, F1, false alerts per user-day (all and calm days), delays.

    A *calm day* is a UTC day inside ``observed`` that overlaps no labelled episode; false
    alerts raised on it count towards ``false_alerts_per_calm_user_day``.
    """
    if "kind" in labels.columns:
        labels = labels.filter(pl.col("kind") == "stress")
    labels = _utc(labels.select("user", "start", "end"), "start", "end")
    observed = _utc(observed.select("user", "start", "end"), "start", "end")
    alerts = _utc(alerts.select("user", "raised_at"), "raised_at")
    alerts = (
        alerts.join(observed.rename({"start": "o_start", "end": "o_end"}), on="user", how="inner")
        .filter(pl.col("raised_at").is_between(pl.col("o_start"), pl.col("o_end")))
        .select("user", "raised_at")
        .with_row_index("alert_id")
    )
    labels = (
        labels.join(observed.rename({"start": "o_start", "end": "o_end"}), on="user", how="inner")
        .filter(pl.col("start").is_between(pl.col("o_start"), pl.col("o_end")))
        .select("user", "start", "end")
        .with_row_index("episode_id")
    )
    grace = pl.duration(seconds=grace_s)
    pairs = alerts.join(labels, on="user", how="inner").filter(
        (pl.col("raised_at") >= pl.col("start")) & (pl.col("raised_at") <= pl.col("end") + grace)
    )
    first = pairs.group_by("episode_id").agg(pl.col("raised_at").min().alias("first_alert"))
    episodes = labels.join(first, on="episode_id", how="left").with_columns(
        pl.col("first_alert").is_not_null().alias("detected"),
        (pl.col("first_alert") - pl.col("start")).dt.total_seconds(fractional=True).alias("delay_s"),
    )
    matched_ids = pairs.get_column("alert_id").unique()
    alerts = alerts.with_columns(pl.col("alert_id").is_in(matched_ids.implode()).alias("matched"))

    # calm days: UTC days fully or partly observed with no labelled episode overlapping them
    days = (
        observed.with_columns(pl.datetime_ranges(pl.col("start").dt.truncate("1d"), pl.col("end"), "1d").alias("day"))
        .explode("day")
        .with_columns(
            ((pl.min_horizontal(pl.col("end"), pl.col("day") + pl.duration(days=1)) - pl.max_horizontal(pl.col("start"), pl.col("day")))
             .dt.total_seconds(fractional=True) / DAY_S).clip(0, 1).alias("frac")
        )
        .select("user", "day", "frac")
    )
    ep_days = labels.with_columns(pl.datetime_ranges(pl.col("start").dt.truncate("1d"), pl.col("end"), "1d").alias("day")).explode("day")
    calm = days.join(ep_days.select("user", "day").unique(), on=["user", "day"], how="anti")
    false_alerts = alerts.filter(~pl.col("matched")).with_columns(pl.col("raised_at").dt.truncate("1d").alias("day"))
    calm_false = false_alerts.join(calm.select("user", "day"), on=["user", "day"], how="semi")

    users = observed.get_column("user").unique().sort().to_list()
    rows = []
    for u in users:
        e = episodes.filter(pl.col("user") == u)
        a = alerts.filter(pl.col("user") == u)
        m = _metrics(
            e.height,
            int(e.get_column("detected").sum()),
            a.height,
            int((~a.get_column("matched")).sum()),
            float(days.filter(pl.col("user") == u).get_column("frac").sum()),
            float(calm.filter(pl.col("user") == u).get_column("frac").sum()),
            calm_false.filter(pl.col("user") == u).height,
            e.get_column("delay_s").drop_nulls(),
        )
        rows.append({"user": u, **m})
    overall = _metrics(
        episodes.height,
        int(episodes.get_column("detected").sum()),
        alerts.height,
        int((~alerts.get_column("matched")).sum()),
        float(days.get_column("frac").sum()),
        float(calm.get_column("frac").sum()),
        calm_false.height,
        episodes.get_column("delay_s").drop_nulls(),
    )
    by_user = pl.DataFrame(rows) if rows else pl.DataFrame(schema={"user": pl.String})
    return Evaluation(overall, by_user, episodes.drop("episode_id"), alerts.drop("alert_id"))
