"""The ingest message on ``{prefix}/ingest/{user}``: a batch of samples, JSON or binary.

JSON (``schema_version`` 1), columnar::

    {"schema_version": 1, "user": "alice", "stream_id": "…", "seq": 7, "source": "ble_hrs/…",
     "time_ns": [...], "metric": ["rr_ms", ...], "value": [...]}

The same batch may arrive in the compact binary format of :mod:`stresswatch.wire.binary`
(first bytes ``FF 53 57``); :func:`decode_ingest` takes both, told apart by the first byte
(docs/INGEST.md). Whatever the format, a decoded batch has passed every check of
:mod:`stresswatch.wire.limits`: ids by the id grammar, times in the absolute range (and, given
``now``, in the window around it), finite values within their metric's bounds, sizes under
their caps. Anything else raises :class:`~stresswatch.errors.WireError`.
"""

from __future__ import annotations

import math
from datetime import datetime

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..errors import WireError
from ..model import SAMPLES_SCHEMA, Metric
from . import binary
from .ids import ID_RULE, is_valid_id
from .json import checked_id, decode_json, refuse
from .limits import (
    MAX_BATCH_SAMPLES,
    MAX_INGEST_BYTES,
    MAX_SEQ,
    MAX_SOURCE_CHARS,
    MAX_STREAM_ID_CHARS,
    TIME_MAX_NS,
    TIME_MIN_NS,
    VALUE_BOUNDS,
    TimeWindow,
)

_METRICS = tuple(Metric(m) for m in binary.METRICS)
# The tightest upper bound: a batch whose values all lie in [0, _FAST_MAX] needs no per-metric pass.
_FAST_MAX = min(hi for _, hi in VALUE_BOUNDS.values())


def _printable(text: str) -> bool:
    return text.isprintable()


class IngestBatch(BaseModel):
    """A batch as the engine uses it. Construct through :func:`decode_ingest` (or the model's
    validation) to get the boundary's guarantees; ``model_construct`` bypasses them."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    schema_version: int = Field(default=1, ge=1, le=1)
    user: str
    stream_id: str = Field(min_length=1, max_length=MAX_STREAM_ID_CHARS)
    seq: int = Field(ge=0, le=MAX_SEQ)
    source: str = Field(max_length=MAX_SOURCE_CHARS)
    time_ns: list[int] = Field(max_length=MAX_BATCH_SAMPLES)
    metric: list[Metric] = Field(max_length=MAX_BATCH_SAMPLES)
    value: list[float] = Field(max_length=MAX_BATCH_SAMPLES)

    @field_validator("user")
    @classmethod
    def _user_id(cls, v: str) -> str:
        return checked_id("user", v)

    @field_validator("stream_id", "source")
    @classmethod
    def _printable_text(cls, v: str) -> str:
        if not _printable(v):
            raise refuse("malformed", "must not contain control characters")
        return v

    @model_validator(mode="after")
    def _columns(self, info: ValidationInfo) -> IngestBatch:
        if not len(self.time_ns) == len(self.metric) == len(self.value):
            raise refuse("malformed", "time_ns, metric and value must have the same length")
        window = (info.context or {}).get("window_ns")
        problem = check_columns(self.time_ns, self.metric, self.value, window, finite=True)  # allow_inf_nan=False
        if problem is not None:
            raise refuse(*problem)
        return self

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, *, user: str, stream_id: str, seq: int, source: str) -> IngestBatch:
        return cls(
            user=user,
            stream_id=stream_id,
            seq=seq,
            source=source,
            time_ns=frame.get_column("time").dt.epoch("ns").to_list(),
            metric=frame.get_column("metric").to_list(),
            value=frame.get_column("value").to_list(),
        )

    def to_frame(self) -> pl.DataFrame:
        n = len(self.time_ns)
        return pl.DataFrame(
            {
                "user": [self.user] * n,
                "time": pl.Series(self.time_ns, dtype=pl.Int64).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
                "metric": [m.value for m in self.metric],
                "value": pl.Series(self.value, dtype=pl.Float64),
                "source": [self.source] * n,
            },
            schema=SAMPLES_SCHEMA,
        )

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    def encode_binary(self) -> bytes:
        """The same batch in the compact binary format (:mod:`stresswatch.wire.binary`)."""
        return binary.encode(
            user=self.user,
            stream_id=self.stream_id,
            seq=self.seq,
            source=self.source,
            time_ns=self.time_ns,
            metric_code=[binary.METRIC_CODE[m.value] for m in self.metric],
            value=self.value,
        )

    @classmethod
    def decode(cls, payload: bytes, *, topic: str = "ingest", now: datetime | None = None, window: TimeWindow = TimeWindow()) -> IngestBatch:
        """:func:`decode_ingest`."""
        return decode_ingest(payload, topic=topic, now=now, window=window)


def check_columns(
    time_ns: list[int], metric: list[Metric] | list[int], value: list[float], window_ns: tuple[int, int] | None, *, finite: bool = False
) -> tuple[str, str] | None:
    """(reason, message) for the first column outside the limits, or None. ``metric`` holds
    :class:`Metric` members (JSON) or binary metric codes; ``finite``: the caller's decoder has
    already refused non-finite values (pydantic's ``allow_inf_nan=False``, the binary decoder)."""
    if not time_ns:
        return None
    lo, hi = window_ns if window_ns is not None else (TIME_MIN_NS, TIME_MAX_NS - 1)
    lo, hi = max(lo, TIME_MIN_NS), min(hi, TIME_MAX_NS - 1)
    if min(time_ns) < lo or max(time_ns) > hi:
        why = "outside the accepted window around now" if window_ns is not None else "outside 2000-2200"
        return "time_range", f"time_ns {why} (docs/INGEST.md)"
    if not finite and not all(map(math.isfinite, value)):
        return "value_range", "values must be finite"
    if min(value) >= 0.0 and max(value) <= _FAST_MAX:
        return None
    names = binary.METRICS if metric and isinstance(metric[0], int) and not isinstance(metric[0], Metric) else None
    for m, v in zip(metric, value):
        name = names[m] if names is not None else m.value  # type: ignore[index,union-attr]
        low, high = VALUE_BOUNDS[name]
        if not low <= v <= high:
            return "value_range", f"a {name} value is outside {low:g}..{high:g}"
    return None


def representable(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of a samples frame an ingest batch can carry (finite values within their
    metric's bounds, times in 2000-2200): what a sender keeps before batching, so a sensor's
    glitch costs one sample, not the batch."""
    bounds = pl.lit(False)
    for metric, (low, high) in VALUE_BOUNDS.items():
        bounds = bounds | ((pl.col("metric") == metric) & pl.col("value").is_between(low, high))
    t = pl.col("time").dt.epoch("ns")
    return frame.filter(bounds & pl.col("value").is_finite() & t.is_between(TIME_MIN_NS, TIME_MAX_NS - 1))


def decode_ingest(payload: bytes, *, topic: str = "ingest", now: datetime | None = None, window: TimeWindow = TimeWindow()) -> IngestBatch:
    """Parse a payload, JSON or binary, and check it against the limits (the window around
    ``now`` if given); anything else raises :class:`WireError` naming the field."""
    window_ns = window.ingest_ns(now) if now is not None else None
    if binary.is_binary(payload):
        if len(payload) > MAX_INGEST_BYTES:
            raise WireError(f"payload of {len(payload)} bytes exceeds the limit of {MAX_INGEST_BYTES}", reason="too_large", source=topic)
        b = binary.decode(payload, source=topic)
        if not is_valid_id(b.user):
            raise WireError(f"user id must be {ID_RULE}", reason="bad_id", source=topic, field="user")
        if not (_printable(b.stream_id) and _printable(b.source)) or len(b.source) > MAX_SOURCE_CHARS:
            raise WireError("stream_id and source must be printable (source at most 256 characters)", reason="malformed", source=topic, field="source")
        problem = check_columns(b.time_ns, b.metric_code, b.value, window_ns, finite=True)
        if problem is not None:
            raise WireError(problem[1], reason=problem[0], source=topic, field="time_ns" if problem[0] == "time_range" else "value")
        return IngestBatch.model_construct(
            schema_version=1, user=b.user, stream_id=b.stream_id, seq=b.seq, source=b.source,
            time_ns=b.time_ns, metric=[_METRICS[c] for c in b.metric_code], value=b.value,
        )  # fmt: skip
    return decode_json(IngestBatch, payload, source=topic, max_bytes=MAX_INGEST_BYTES, context={"window_ns": window_ns})


__all__ = ["MAX_BATCH_SAMPLES", "IngestBatch", "check_columns", "decode_ingest", "representable"]
