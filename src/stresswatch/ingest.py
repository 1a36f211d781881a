"""Ingest: sample batches from a user's companion to the engine over ``{prefix}/ingest/{user}``.

A batch carries ``stream_id`` (one per companion stream session) and ``seq`` (0, 1, 2, ...
within it). QoS 1 and the companion's durable buffer may deliver a batch more than once;
:class:`Deduplicator` makes the engine see each (stream_id, seq) exactly once.

Wire format (``schema_version`` 1): a JSON object (pydantic :class:`IngestBatch`), columnar::

    {"schema_version": 1, "user": "alice", "stream_id": "…", "seq": 7, "source": "ble_hrs/…",
     "time_ns": [...], "metric": ["rr_ms", ...], "value": [...]}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ParseError
from .model import SAMPLES_SCHEMA, Metric

MAX_BATCH_SAMPLES = 100_000


class IngestBatch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(default=1, ge=1, le=1)
    user: str = Field(min_length=1)
    stream_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)
    source: str
    time_ns: list[int] = Field(max_length=MAX_BATCH_SAMPLES)
    metric: list[Metric] = Field(max_length=MAX_BATCH_SAMPLES)
    value: list[float] = Field(max_length=MAX_BATCH_SAMPLES)

    @model_validator(mode="after")
    def _same_length(self) -> IngestBatch:
        if not len(self.time_ns) == len(self.metric) == len(self.value):
            raise ValueError("time_ns, metric and value must have the same length")
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

    @classmethod
    def decode(cls, payload: bytes, *, topic: str = "ingest") -> IngestBatch:
        """Parse a payload; anything malformed raises :class:`ParseError` naming the field."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            field_name = ".".join(str(p) for p in err["loc"]) or None
            raise ParseError(err["msg"], source=topic, field=field_name) from None


@dataclass
class Deduplicator:
    """Exactly-once view of at-least-once batches, per (user, stream_id), in bounded memory.

    Remembers the highest ``seq`` below which every batch was seen, plus the few seen
    above it (out of order). A stream that restarts gets a new ``stream_id``.
    """

    max_pending: int = 10_000
    _floor: dict[tuple[str, str], int] = field(default_factory=dict)  # all seq < floor seen
    _above: dict[tuple[str, str], set[int]] = field(default_factory=dict)

    def first_time(self, batch: IngestBatch) -> bool:
        key = (batch.user, batch.stream_id)
        floor = self._floor.get(key, 0)
        above = self._above.setdefault(key, set())
        if batch.seq < floor or batch.seq in above:
            return False
        above.add(batch.seq)
        while floor in above:
            above.remove(floor)
            floor += 1
        if len(above) > self.max_pending:  # a lost batch must not grow memory forever
            floor = min(above)
            while floor in above:
                above.remove(floor)
                floor += 1
        self._floor[key] = floor
        return True
