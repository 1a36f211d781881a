"""The data contracts of SPEC.md: samples, windows, alerts. Units live in the names.

Samples travel as columnar :class:`polars.DataFrame` batches with :data:`SAMPLES_SCHEMA`;
windows as frames with :data:`WINDOW_SCHEMA`; alerts leave the engine as the
:class:`Alert` pydantic model (the MQTT JSON payload).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone


import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from .errors import ParseError

TIME = pl.Datetime("ns", "UTC")


class Metric(str, enum.Enum):
    """The `metric` column of samples (SPEC: samples)."""

    HR_BPM = "hr_bpm"
    RR_MS = "rr_ms"  # `time` is the beat that ends the interval
    STEPS = "steps"
    MOTION = "motion"


METRICS = tuple(m.value for m in Metric)

SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "user": pl.String(),
    "time": TIME,
    "metric": pl.String(),
    "value": pl.Float64(),
    "source": pl.String(),
}


class WindowState(str, enum.Enum):
    """The `state` column of windows (SPEC: windows)."""

    CALIBRATING = "calibrating"
    OK = "ok"
    ELEVATED = "elevated"
    SUPPRESSED_MOTION = "suppressed_motion"
    INSUFFICIENT_DATA = "insufficient_data"


WINDOW_SCHEMA: dict[str, pl.DataType] = {
    "user": pl.String(),
    "window_start": TIME,
    "window_end": TIME,
    "n_beats": pl.Int64(),
    "n_rr_removed": pl.Int64(),
    "coverage": pl.Float64(),
    "hr_mean": pl.Float64(),
    "rmssd_ms": pl.Float64(),
    "ln_rmssd": pl.Float64(),
    "sdnn_ms": pl.Float64(),
    "pnn50": pl.Float64(),
    "steps": pl.Float64(),
    "hr_baseline": pl.Float64(),
    "hr_z": pl.Float64(),
    "ln_rmssd_baseline": pl.Float64(),
    "ln_rmssd_z": pl.Float64(),
    "score": pl.Float64(),
    "state": pl.String(),
    # additive (detector issue): mean `motion` sample, signal kind (rr / hr_only / none),
    # and the time-of-day baseline slot the window was compared with
    "motion": pl.Float64(),
    "signal": pl.String(),
    "baseline_slot": pl.Int64(),
}


def empty_samples() -> pl.DataFrame:
    return pl.DataFrame(schema=SAMPLES_SCHEMA)


def validate_samples(frame: pl.DataFrame, *, source: str = "samples") -> pl.DataFrame:
    """Return ``frame`` in the exact samples schema, or raise :class:`ParseError` naming the field.

    Accepts naive datetimes as UTC and any integer/float `value`; rejects unknown metrics,
    missing columns, and null user/time/metric.
    """
    missing = [c for c in SAMPLES_SCHEMA if c not in frame.columns]
    if missing:
        raise ParseError(f"missing column(s) {', '.join(missing)}", source=source, field=missing[0])
    frame = frame.select(list(SAMPLES_SCHEMA))
    time_dtype = frame.schema["time"]
    try:
        if isinstance(time_dtype, pl.Datetime):
            t = pl.col("time")
            if time_dtype.time_zone is None:
                t = t.dt.replace_time_zone("UTC")
            frame = frame.with_columns(t.dt.convert_time_zone("UTC").dt.cast_time_unit("ns"))
        elif time_dtype == pl.String:
            frame = frame.with_columns(
                pl.col("time").str.to_datetime(time_unit="ns", time_zone="UTC", strict=True)
            )
        else:
            raise ParseError(f"expected a datetime, got {time_dtype}", source=source, field="time")
        frame = frame.cast({"user": pl.String, "metric": pl.String, "value": pl.Float64, "source": pl.String})
    except (pl.exceptions.ComputeError, pl.exceptions.InvalidOperationError) as exc:
        bad = next((c for c in ("time", "value") if c in str(exc)), None)
        raise ParseError(f"cannot convert: {str(exc).splitlines()[0]}", source=source, field=bad) from None
    for col in ("user", "time", "metric"):
        nulls = frame.get_column(col).null_count()
        if nulls:
            row = int(frame.with_row_index().filter(pl.col(col).is_null()).item(0, "index"))
            raise ParseError(f"{nulls} empty value(s)", source=source, position=f"row {row + 1}", field=col)
    unknown = frame.filter(~pl.col("metric").is_in(METRICS))
    if unknown.height:
        row = int(frame.with_row_index().filter(~pl.col("metric").is_in(METRICS)).item(0, "index"))
        raise ParseError(
            f"unknown metric {unknown.item(0, 'metric')!r} (expected one of {', '.join(METRICS)})",
            source=source,
            position=f"row {row + 1}",
            field="metric",
        )
    return frame


class AlertLevel(str, enum.Enum):
    ELEVATED = "elevated"
    HIGH = "high"


class Reason(str, enum.Enum):
    """Machine-readable reason codes carried by every alert (SPEC: alert)."""

    HRV_BELOW_BASELINE = "hrv_below_baseline"
    HR_ABOVE_BASELINE = "hr_above_baseline"
    SELF_REPORT = "self_report"  # the person asked for contact themselves (`stresswatch checkin`)


_ALERT_NAMESPACE = uuid.UUID("6f1c2d8e-4b7a-5c3e-9a1d-2e5f7b9c0a11")


def alert_id_for(user: str, episode_start: datetime) -> str:
    """Stable id for the alert of one episode: a re-send, a replay or a restart keeps it."""
    return str(uuid.uuid5(_ALERT_NAMESPACE, f"{user}|{episode_start.astimezone(timezone.utc).isoformat()}"))


@dataclass(frozen=True, slots=True)
class AlertDecision:
    """What the detector raised, before consent: internal, carries the real user id."""

    alert_id: str
    user: str
    raised_at: datetime  # end of the window that completed the evidence (data time)
    episode_start: datetime
    level: AlertLevel
    reasons: tuple[Reason, ...]
    score: float
    note: str | None = None  # a check-in's own words from the person to the workers they chose


class Alert(BaseModel):
    """The MQTT payload a support worker receives. Only what the user's consent lets them see."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    alert_id: str
    user: str = Field(description="the name the user consented to be shown as (a pseudonym by default)")
    raised_at: datetime
    episode_start: datetime
    level: AlertLevel | None = Field(default=None, description="present only if the user allows it")
    reasons: list[Reason] = Field(default_factory=list, description="present only if the user allows it")
    message: str = "Someone you support may welcome a check-in."
    note: str | None = Field(default=None, description="a check-in: the person's own words to the workers they chose")
    score: float | None = Field(default=None, description="present only if the user explicitly allows it")
    notice: int = Field(default=0, ge=0, description="0: first notice; n: n-th reminder or escalation, same alert_id")
