"""Samples files: Parquet or CSV already in the SPEC's samples schema.

CSV errors name the line (the header is line 1); Parquet errors name the column.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from stresswatch.errors import ParseError
from stresswatch.model import SAMPLES_SCHEMA, validate_samples


class SamplesFileSource:
    """Reads one samples file and yields batches of ``batch_s`` seconds of data time."""

    kind: ClassVar[str] = "samples"
    suffixes: ClassVar[tuple[str, ...]] = (".parquet", ".csv")

    def __init__(self, path: Path, *, batch_s: int = 3600, **_: Any) -> None:
        self.path = Path(path)
        self.batch_s = batch_s

    def read(self) -> pl.DataFrame:
        """The whole file, validated and sorted by time then user."""
        if not self.path.is_file():
            raise ParseError("no such file", source=self.path)
        try:
            if self.path.suffix.lower() == ".csv":
                frame = pl.read_csv(
                    self.path,
                    schema_overrides={"user": pl.String, "metric": pl.String, "source": pl.String, "time": pl.String},
                )
                frame = self._parse_csv_values(frame)
            else:
                frame = pl.read_parquet(self.path)
        except ParseError:
            raise
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ParseError(f"cannot read: {str(exc).splitlines()[0]}", source=self.path) from None
        return validate_samples(frame, source=str(self.path)).sort("time", "user", maintain_order=True)

    def _parse_csv_values(self, frame: pl.DataFrame) -> pl.DataFrame:
        # Parse per column here so the error can name the CSV line (header = line 1).
        for col, dtype in (("value", pl.Float64),):
            if col not in frame.columns:
                continue
            parsed = frame.get_column(col).cast(dtype, strict=False)
            bad = parsed.is_null() & frame.get_column(col).is_not_null()
            if bad.any():
                line = int(bad.arg_max() or 0) + 2
                raise ParseError(
                    f"not a number: {frame.get_column(col)[line - 2]!r}", source=self.path, position=f"line {line}", field=col
                )
            frame = frame.with_columns(parsed)
        if "time" in frame.columns:
            parsed_t = frame.get_column("time").str.to_datetime(time_unit="ns", time_zone="UTC", strict=False)
            bad = parsed_t.is_null() & frame.get_column("time").is_not_null()
            if bad.any():
                line = int(bad.arg_max() or 0) + 2
                raise ParseError(
                    f"not an ISO 8601 time: {frame.get_column('time')[line - 2]!r}",
                    source=self.path,
                    position=f"line {line}",
                    field="time",
                )
            frame = frame.with_columns(parsed_t)
        return frame

    async def __aiter__(self) -> AsyncIterator[pl.DataFrame]:  # type: ignore[override]
        frame = self.read()
        if frame.height == 0:
            return
        bucket = pl.col("time").dt.epoch("s") // self.batch_s
        for _, part in frame.group_by(bucket, maintain_order=True):
            yield part.select(list(SAMPLES_SCHEMA))
