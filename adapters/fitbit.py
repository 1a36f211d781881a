"""Fitbit account export ("Download your data", and the newer Google-era layout).

Files read (anywhere under the export folder or zip):

* ``heart_rate-YYYY-MM-DD.json``: ``[{"dateTime": "04/22/19 04:00:05", "value": {"bpm": 69,
  "confidence": 2}}, ...]`` -> ``hr_bpm``. Every reading is kept whatever its
  ``confidence`` (0-3): the detector's own quality rules decide, and dropping them here
  would hide data the user gave us.
* ``heart_rate_YYYY-MM-DD.csv`` (newer exports): ``timestamp,beats per minute,data source``
  -> ``hr_bpm``; an ISO time with an offset is taken as is, a naive one is local time.
* ``Heart Rate Variability Details - DATE.csv``: ``timestamp,rmssd,coverage,low_frequency,
  high_frequency``, one RMSSD per 5 minutes of sleep. The samples schema has no metric for a
  5-minute RMSSD (``model.Metric`` is hr_bpm, rr_ms, steps, motion, and the detector
  computes RMSSD from beats itself), so these rows are **read, validated and reported as
  rejected** with the reason "RMSSD summaries are not samples"; the user sees they were
  seen and why they were not stored. Adding a summary metric would need the detector to
  treat it differently from beat data: a SPEC change, not an adapter decision.

Fitbit writes local wall-clock times without a zone; ``--tz`` names it (default UTC).
Times that do not exist in that zone (the hour skipped at a DST change) are rejected;
times that exist twice (the repeated hour) take the earlier (summer-time) reading.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from stresswatch.errors import ParseError
from stresswatch.importing import ExportSource, InputFile, plausible
from stresswatch.model import SAMPLES_SCHEMA

from .tabular import check_tz, parse_times

_JSON = re.compile(r"heart_rate-\d{4}-\d{2}-\d{2}\.json$")
_CSV = re.compile(r"heart_rate_\d{4}-\d{2}-\d{2}\.csv$")
_HRV = re.compile(r"Heart Rate Variability Details - .*\.csv$")
_HRV_COLUMNS = ("timestamp", "rmssd", "coverage", "low_frequency", "high_frequency")


def parse_fitbit_json(data: bytes, *, source: str = "fitbit") -> tuple[list[str], list[Any], int]:
    """``heart_rate-*.json`` bytes -> (dateTime strings, bpm values, malformed entries). Pure.

    Raises :class:`ParseError` if the bytes are not a JSON list; entries without a
    ``dateTime`` string or a ``value.bpm`` are counted, not raised.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        pos = getattr(exc, "pos", None)
        raise ParseError(f"not valid JSON: {getattr(exc, 'msg', exc)}", source=source, position=f"byte {pos}" if pos is not None else None) from None
    if not isinstance(doc, list):
        raise ParseError(f"expected a JSON list of heart-rate readings, got {type(doc).__name__}", source=source, position="byte 0")
    times: list[str] = []
    bpms: list[Any] = []
    bad = 0
    for entry in doc:
        value = entry.get("value") if isinstance(entry, dict) else None
        t = entry.get("dateTime") if isinstance(entry, dict) else None
        bpm = value.get("bpm") if isinstance(value, dict) else None
        if not isinstance(t, str) or not isinstance(bpm, (int, float)) or isinstance(bpm, bool):
            bad += 1
            continue
        times.append(t)
        bpms.append(float(bpm))
    return times, bpms, bad


class FitbitSource(ExportSource):
    """``stresswatch import fitbit PATH [--tz ZONE]``: a file, the export folder, or its zip."""

    kind: ClassVar[str] = "fitbit"
    # .json/.csv are shared with other kinds, so Fitbit is chosen by kind, never by suffix.
    suffixes: ClassVar[tuple[str, ...]] = ()
    what: ClassVar[str] = "Fitbit heart-rate files (heart_rate-*.json, heart_rate_*.csv, Heart Rate Variability Details - *.csv)"

    def __init__(self, path: Path, *, user: str | None = None, **options: Any) -> None:
        super().__init__(path, user=user, **options)
        self.tz = check_tz(options.get("tz"))

    @classmethod
    def accept(cls, name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return bool(_JSON.match(base) or _CSV.match(base) or _HRV.match(base))

    def _frame(self, times: pl.Series, bpm: pl.Series, source: pl.Series | str, label: str) -> pl.DataFrame:
        n = len(times)
        out = pl.DataFrame(
            {
                "user": pl.repeat(self.user, n, dtype=pl.String, eager=True),
                "time": times,
                "metric": pl.repeat("hr_bpm", n, dtype=pl.String, eager=True),
                "value": bpm.cast(pl.Float64, strict=False),
                "source": source if isinstance(source, pl.Series) else pl.repeat(source, n, dtype=pl.String, eager=True),
            }
        )
        for reason, bad in (
            ("time does not parse or does not exist in --tz", pl.col("time").is_null()),
            ("heart rate is empty or not a number", pl.col("value").is_null()),
        ):
            k = int(out.select(bad.sum()).item())
            if k:
                self.report.reject(f"{label}: {reason}", k, metric="hr_bpm")
                out = out.filter(~bad)
        return plausible(out, self.report, label=label).select(list(SAMPLES_SCHEMA)).sort("time", maintain_order=True)

    def _read_csv(self, data: bytes, inp: InputFile, required: tuple[str, ...]) -> pl.DataFrame:
        try:
            frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
        except (pl.exceptions.PolarsError, ValueError) as exc:
            raise ParseError(f"cannot read as CSV: {str(exc).splitlines()[0]}", source=inp.name) from None
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise ParseError(
                f"missing column(s) {', '.join(missing)} (found: {', '.join(frame.columns) or 'none'})",
                source=inp.name,
                position="line 1",
                field=missing[0],
            )
        return frame

    def parse(self, inp: InputFile) -> Iterator[pl.DataFrame]:
        base = inp.name.rsplit("/", 1)[-1]
        data = inp.read_bytes()
        if base.lower().endswith(".json"):
            times, bpms, bad = parse_fitbit_json(data, source=inp.name)
            self.report.read += len(times) + bad
            self.report.reject("fitbit json: entry without dateTime or value.bpm", bad, metric="hr_bpm")
            t = pl.Series(times, dtype=pl.String).str.to_datetime("%m/%d/%y %H:%M:%S", time_unit="ns", strict=False)
            t = t.dt.replace_time_zone(self.tz, non_existent="null", ambiguous="earliest").dt.convert_time_zone("UTC")
            yield self._frame(t, pl.Series(bpms, dtype=pl.Float64), "fitbit", "fitbit json")
        elif _HRV.match(base):
            frame = self._read_csv(data, inp, _HRV_COLUMNS)
            self.report.read += frame.height
            self.report.reject("fitbit hrv details: RMSSD summaries are not samples (no metric for them)", frame.height, metric="rmssd summary")
        else:
            frame = self._read_csv(data, inp, ("timestamp", "beats per minute"))
            self.report.read += frame.height
            source: pl.Series | str = "fitbit"
            if "data source" in frame.columns:
                source = ("fitbit/" + frame.get_column("data source").fill_null("unknown").str.to_lowercase()).alias("source")
            yield self._frame(parse_times(frame.get_column("timestamp"), self.tz), frame.get_column("beats per minute"), source, "fitbit csv")
