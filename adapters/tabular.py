"""Tables: samples files already in the SPEC's schema, and any CSV/Parquet with a column mapping.

:class:`SamplesFileSource` (kind ``samples``): CSV errors name the line (the header is line
1); Parquet errors name the column. :class:`MappedTableSource` (kind ``table``): a generic
reader whose columns are named with ``--map``; bad rows are rejected and counted.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from stresswatch.errors import ParseError
from stresswatch.importing import ExportSource, InputFile, plausible
from stresswatch.model import METRICS, SAMPLES_SCHEMA, validate_samples


class SamplesFileSource:
    """Reads one samples file and yields batches of ``batch_s`` seconds of data time."""

    kind: ClassVar[str] = "samples"
    suffixes: ClassVar[tuple[str, ...]] = (".parquet", ".csv")

    def __init__(self, path: Path, *, batch_s: int = 3600, **_: Any) -> None:
        self.path = Path(path)
        self.batch_s = batch_s

    def users(self) -> list[str] | None:
        """The user ids in the file without reading the samples (Parquet only; else None).
        Lets a replay plan which files must be read together before reading any of them."""
        if self.path.suffix.lower() != ".parquet" or not self.path.is_file():
            return None
        try:
            return pl.scan_parquet(self.path).select(pl.col("user").unique()).collect().get_column("user").drop_nulls().to_list()
        except (pl.exceptions.PolarsError, OSError):
            return None  # read() will name the problem

    def scan(self) -> pl.LazyFrame | None:
        """The file as a lazy frame of the samples columns in file order (Parquet only; else
        None), so a replay can read it in parts without holding it whole. Each part still
        needs ``validate_samples``; where a part fails it, :meth:`read` names the error."""
        if self.path.suffix.lower() != ".parquet" or not self.path.is_file():
            return None
        try:
            lf = pl.scan_parquet(self.path)
            if any(c not in lf.collect_schema() for c in SAMPLES_SCHEMA):
                return None  # read() will name the missing column
        except (pl.exceptions.PolarsError, OSError):
            return None
        return lf.select(list(SAMPLES_SCHEMA))

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


# --- generic tables with a column mapping -------------------------------------------------

_TARGETS = ("time", "value", "metric", "user", "source")
_EPOCH_UNITS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def _sniff_separator(head: bytes) -> str:
    line = head.split(b"\n", 1)[0]
    counts = {sep: line.count(sep.encode()) for sep in (",", "\t", ";", "|")}
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] else ","


def _epoch_unit(values: pl.Series) -> str:
    """Guess the unit of epoch numbers from their magnitude (years 1973-2286 in any unit)."""
    mag = float(values.abs().median() or 0)
    for unit, lower in (("ns", 1e17), ("us", 1e14), ("ms", 1e11)):
        if mag >= lower:
            return unit
    return "s"


class MappedTableSource(ExportSource):
    """``stresswatch import table PATH --map time=COL --map value=COL (--metric M | --map metric=COL)``.

    Any CSV/TSV (separator sniffed from the header line) or Parquet file whose columns are
    named by the mapping (targets: time, value, metric, user, source; unmapped targets
    default to a column of the same name if present). Times may be ISO 8601 text (naive
    ones are in ``--tz``, default UTC) or epoch numbers (``--time-unit``, or guessed from
    their magnitude). Rows whose time or value does not parse, whose metric is unknown, or
    whose heart rate / RR interval is implausible are rejected and counted per reason.
    """

    kind: ClassVar[str] = "table"
    # Chosen by kind only: a mapping is needed anyway, and .csv/.parquet belong to `samples`.
    suffixes: ClassVar[tuple[str, ...]] = ()
    what: ClassVar[str] = "tables (*.csv, *.tsv, *.txt, *.parquet)"

    @classmethod
    def accept(cls, name: str) -> bool:
        return name.lower().endswith((".csv", ".tsv", ".txt", ".parquet"))

    def __init__(self, path: Path, *, user: str | None = None, **options: Any) -> None:
        super().__init__(path, user=user, **options)
        mapping = dict(options.get("mapping") or {})
        unknown = sorted(set(mapping) - set(_TARGETS))
        if unknown:
            raise ParseError(f"unknown mapping target(s) {', '.join(unknown)} (known: {', '.join(_TARGETS)})", source="--map")
        self.mapping = mapping
        self.metric = options.get("metric")
        self.tz = check_tz(options.get("tz"))
        self.time_unit = options.get("time_unit") or "auto"
        start = options.get("start")  # numeric times are offsets from this (a recording's start)
        self.start_ns: int | None = None if start is None else int(start.timestamp()) * 1_000_000_000 + start.microsecond * 1000

    def _read(self, inp: InputFile) -> pl.DataFrame:
        data = inp.read_bytes()
        try:
            if inp.name.lower().endswith(".parquet"):
                return pl.read_parquet(io.BytesIO(data))
            return pl.read_csv(
                io.BytesIO(data), separator=_sniff_separator(data[:65536]), infer_schema_length=10000, truncate_ragged_lines=False
            )
        except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
            raise ParseError(f"cannot read as a table: {str(exc).splitlines()[0]}", source=inp.name) from None

    def _column(self, frame: pl.DataFrame, target: str, inp: InputFile, *, required: bool) -> pl.Series | None:
        name = self.mapping.get(target, target)
        if name in frame.columns:
            return frame.get_column(name)
        if required or target in self.mapping:
            raise ParseError(
                f"no column {name!r} for {target} (columns: {', '.join(frame.columns)}); map one with --map {target}=COLUMN",
                source=inp.name,
                field=name,
            )
        return None

    def _times(self, col: pl.Series) -> pl.Series:
        if self.start_ns is not None:
            if not col.dtype.is_numeric():
                raise ParseError(
                    f"--start-time is for times given as numbers from the start of a recording; this column holds {col.dtype}",
                    source=str(self.path),
                    field=self.mapping.get("time", "time"),
                )
            unit = self.time_unit if self.time_unit != "auto" else "s"
            ok = col.cast(pl.Float64).is_finite() & (col.cast(pl.Float64).abs() < 1e15)
            offset_ns = (col.cast(pl.Float64) * _EPOCH_UNITS[unit]).round(0)
            ns = pl.select(pl.when(ok).then(offset_ns).otherwise(None)).to_series().cast(pl.Int64) + self.start_ns
            return ns.cast(pl.Datetime("ns")).dt.replace_time_zone("UTC")
        if col.dtype.is_numeric():
            unit = self.time_unit if self.time_unit != "auto" else _epoch_unit(col.drop_nulls())
            factor = _EPOCH_UNITS[unit]
            if col.dtype.is_integer():
                ok = col.cast(pl.Float64).abs() < 9.2e18 / factor
                ns = pl.select(pl.when(ok).then(col.cast(pl.Int64) * factor).otherwise(None)).to_series()
            else:
                # float epochs: round to the microsecond in float64 (exact there), then scale
                us = (col.cast(pl.Float64) * (factor / 1000)).round(0)
                ok = us.is_finite() & (us.abs() < 9.2e15)
                ns = pl.select(pl.when(ok).then(us).otherwise(None)).to_series().cast(pl.Int64) * 1000
            return ns.cast(pl.Int64).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC")
        if isinstance(col.dtype, pl.Datetime):
            t = col.cast(pl.Datetime("ns", col.dtype.time_zone))
            return t.dt.convert_time_zone("UTC") if col.dtype.time_zone else t.dt.replace_time_zone(self.tz, non_existent="null", ambiguous="earliest").dt.convert_time_zone("UTC")
        return parse_times(col.cast(pl.String), self.tz)

    def parse(self, inp: InputFile) -> Iterator[pl.DataFrame]:
        frame = self._read(inp)
        n = frame.height
        self.report.read += n
        time_col = self._column(frame, "time", inp, required=True)
        value_col = self._column(frame, "value", inp, required=True)
        metric_col = self._column(frame, "metric", inp, required=False)
        if metric_col is None and self.metric is None:
            raise ParseError("which metric? give --metric (e.g. hr_bpm) or --map metric=COLUMN", source=inp.name, field="metric")
        user_col = self._column(frame, "user", inp, required=False) if "user" in self.mapping else None
        source_col = self._column(frame, "source", inp, required=False) if "source" in self.mapping else None
        assert time_col is not None and value_col is not None
        out = pl.DataFrame(
            {
                "user": user_col.cast(pl.String) if user_col is not None else pl.repeat(self.user, n, dtype=pl.String, eager=True),
                "time": self._times(time_col),
                "metric": metric_col.cast(pl.String) if metric_col is not None else pl.repeat(self.metric, n, dtype=pl.String, eager=True),
                "value": value_col.cast(pl.Float64, strict=False),
                "source": source_col.cast(pl.String)
                if source_col is not None
                else pl.repeat(f"table/{Path(inp.name).name}", n, dtype=pl.String, eager=True),
            }
        )
        checks = [
            ("time is empty or does not parse", pl.col("time").is_null()),
            ("value is empty or not a number", pl.col("value").is_null()),
            (f"metric is not one of {', '.join(METRICS)}", ~pl.col("metric").is_in(METRICS) | pl.col("metric").is_null()),
            ("user is empty", pl.col("user").is_null() | (pl.col("user") == "")),
        ]
        for reason, bad in checks:
            k = int(out.select(bad.sum()).item())
            if k:
                self.report.reject(f"table: {reason}", k)
                out = out.filter(~bad)
        out = plausible(out.with_columns(pl.col("source").fill_null("table")), self.report, label="table")
        yield out.select(list(SAMPLES_SCHEMA)).sort("time", maintain_order=True)


def check_tz(tz: str | None) -> str:
    """A valid IANA time-zone name (default UTC), or a clear error naming --tz."""
    if not tz:
        return "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ParseError(f"unknown time zone {tz!r} (use an IANA name such as Europe/Berlin)", source="--tz") from None
    return tz


def parse_times(text: pl.Series, tz: str) -> pl.Series:
    """ISO 8601-ish text -> UTC datetimes; naive times are local to ``tz``; unparseable -> null."""
    text = text.str.strip_chars()
    aware = text.str.contains(r"(Z|[+-]\d\d:?\d\d)$")
    out = pl.Series("time", [None] * len(text), dtype=pl.Datetime("ns", "UTC"))
    if aware.any():
        a = text.filter(aware).str.replace(r"Z$", "+00:00")
        parsed = None
        for fmt in ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z", "%Y-%m-%d %H:%M:%S %z"):
            p = a.str.to_datetime(fmt, time_unit="ns", strict=False).dt.convert_time_zone("UTC")
            parsed = p if parsed is None else parsed.fill_null(p)
        out = out.scatter(aware.arg_true(), parsed)  # type: ignore[arg-type]
    naive = ~aware
    if naive.any():
        n = text.filter(naive)
        parsed = None
        for fmt in ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%m/%d/%y %H:%M:%S", "%m/%d/%Y %H:%M:%S"):
            p = n.str.to_datetime(fmt, time_unit="ns", strict=False)
            parsed = p if parsed is None else parsed.fill_null(p)
        assert parsed is not None
        local = parsed.dt.replace_time_zone(tz, non_existent="null", ambiguous="earliest").dt.convert_time_zone("UTC")
        out = out.scatter(naive.arg_true(), local)
    return out
