"""Consented ingest batches waiting for the detector, and the one frame they become.

Batches are given to the detector together (every ``flush_s``, before any other job, or when
``max_samples`` are waiting): the detector's cost is mostly per call, not per sample, and one
call per batch could not follow more than a few hundred users (benchmarks/load,
docs/SCALING.md).
"""

from __future__ import annotations

import polars as pl

from ..ingest import IngestBatch
from ..model import SAMPLES_SCHEMA


class IngestBuffer:
    """Pending batches, in arrival order. Pure data: the engine decides when to flush."""

    def __init__(self, max_samples: int = 2_000_000) -> None:
        self.max_samples = max_samples
        self._batches: list[IngestBatch] = []
        self._samples = 0

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def full(self) -> bool:
        return self._samples >= self.max_samples

    def add(self, batch: IngestBatch) -> None:
        self._batches.append(batch)
        self._samples += len(batch.time_ns)

    def take(self) -> list[IngestBatch]:
        """Everything pending (the buffer is empty afterwards)."""
        batches, self._batches, self._samples = self._batches, [], 0
        return batches

    def drop_user(self, user: str) -> None:
        self._batches = [b for b in self._batches if b.user != user]
        self._samples = sum(len(b.time_ns) for b in self._batches)


def frame_of(batches: list[IngestBatch]) -> pl.DataFrame:
    """One samples frame of many batches (rows in arrival order; the detector sorts by user)."""
    if len(batches) == 1:
        return batches[0].to_frame()
    users: list[str] = []
    sources: list[str] = []
    times: list[int] = []
    metrics: list[str] = []
    values: list[float] = []
    for b in batches:
        n = len(b.time_ns)
        users += [b.user] * n
        sources += [b.source] * n
        times += b.time_ns
        metrics += b.metric  # str-valued enum members are str: polars reads them as is (7x faster than .value)
        values += b.value
    return pl.DataFrame(
        {
            "user": users,
            "time": pl.Series(times, dtype=pl.Int64).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
            "metric": metrics,
            "value": pl.Series(values, dtype=pl.Float64),
            "source": sources,
        },
        schema=SAMPLES_SCHEMA,
    )


def readable_frame(batches: list[IngestBatch]) -> tuple[pl.DataFrame | None, list[IngestBatch], dict[str, Exception]]:
    """:func:`frame_of` the batches that can become a frame: (frame or None, the batches in
    it, the fault per user whose batches cannot). One user's unreadable batch (a time outside
    int64, ...) must not cost everyone else theirs."""
    try:
        return frame_of(batches), batches, {}
    except Exception:  # noqa: BLE001 - find the user(s) at fault
        pass
    by_user: dict[str, list[IngestBatch]] = {}
    for b in batches:
        by_user.setdefault(b.user, []).append(b)
    good: list[IngestBatch] = []
    bad: dict[str, Exception] = {}
    for user, mine in by_user.items():
        try:
            frame_of(mine)
        except Exception as exc:  # noqa: BLE001
            bad[user] = exc
            continue
        good += mine
    return (frame_of(good) if good else None), good, bad


__all__ = ["IngestBuffer", "frame_of", "readable_frame"]
