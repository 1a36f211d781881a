"""Open mHealth / IEEE 1752.1 data points: heart-rate 2.0 and rr-interval 1.0, in and out.

In (``stresswatch import openmhealth PATH``): a JSON file holding one data point, a list of
data points, or newline-delimited data points (``.ndjson``/``.jsonl``). Every data point is
validated against the IEEE 1752.1 data-point envelope and its body schema (copied in
``omh_schemas/``, MIT, see its README). Then:

* ``omh:heart-rate:2.x`` -> ``hr_bpm`` at ``effective_time_frame.date_time`` (or the
  interval's end, or start + duration).
* ``omh:rr-interval:1.x`` -> ``rr_ms``; its time is the beat that *ends* the interval:
  ``time_interval.end_date_time``, or ``start_date_time`` + the interval, or
  ``date_time`` read as the end beat.

A data point that breaks its schema, or names heart-rate/rr-interval in a version this
reader does not know, raises :class:`~stresswatch.errors.ParseError` naming the file, the
data point's index and the JSON path. Data points of other schemas (step-count, sleep...)
are counted as rejected with the schema named. Date-times without a zone are UTC (as
the schema says).

Out (:func:`to_omh`): a samples frame -> a list of data points (dicts) other commands
(``export``) serialise. Deterministic: a data point's ``uuid`` is a UUIDv5 of the sample,
so exporting twice yields the same ids. Only ``hr_bpm`` and ``rr_ms`` have an Open mHealth
schema here; other metrics are left out (the caller can count them).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, ClassVar

import jsonschema
import polars as pl
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT4

from stresswatch.errors import ParseError
from stresswatch.importing import ExportSource, InputFile, plausible
from stresswatch.model import METRICS, SAMPLES_SCHEMA

from .tabular import parse_times

SCHEMAS = files("stresswatch_adapters") / "omh_schemas"
HEART_RATE = ("omh", "heart-rate", "2.0")
RR_INTERVAL = ("omh", "rr-interval", "1.0")
_BODY_FILES = {"heart-rate": "omh_heart-rate_2-0.json", "rr-interval": "omh_rr-interval_1-0.json"}
_KNOWN_MAJOR = {"heart-rate": "2", "rr-interval": "1"}
_NAMESPACE = uuid.UUID("2b8f3c1e-6d0a-5b7e-8f41-9c3d2e1a0b55")


def _load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text(encoding="utf-8"))


def _retrieve(uri: str) -> Resource:
    name = uri.rsplit("/", 1)[-1]
    try:
        contents = _load(name)
    except (FileNotFoundError, OSError):
        raise NoSuchResource(ref=uri) from None
    return Resource.from_contents(contents, default_specification=DRAFT4)


@cache
def _validators() -> dict[str, Any]:
    registry: Registry = Registry(retrieve=_retrieve)  # type: ignore[call-arg]
    out = {}
    for key, name in (("data-point", "data-point-1.0.json"), *_BODY_FILES.items()):
        schema = _load(name)
        cls = jsonschema.validators.validator_for(schema)
        out[key] = cls(schema, registry=registry)
    return out


def _first_error(validator: Any, instance: Any) -> jsonschema.ValidationError | None:
    return jsonschema.exceptions.best_match(validator.iter_errors(instance))


def validate_data_point(point: Any, *, source: str = "data point", index: int = 0) -> tuple[str, str, str]:
    """Check one data point (envelope + body for known schemas); return its schema id.

    Raises :class:`ParseError` naming the data point and the JSON path of the first error.
    """
    v = _validators()
    err = _first_error(v["data-point"], point)
    if err is not None:
        path = "/".join(str(p) for p in err.absolute_path) or "(data point)"
        raise ParseError(f"not an IEEE 1752.1 data point: {err.message[:200]}", source=source, position=f"data point {index}", field=path)
    sid = point["header"]["schema_id"]
    ns, name, version = sid["namespace"], sid["name"], sid["version"]
    if ns == "omh" and name in _BODY_FILES:
        if version.split(".")[0] != _KNOWN_MAJOR[name]:
            raise ParseError(
                f"unsupported schema version {ns}:{name}:{version} (this reader knows {_KNOWN_MAJOR[name]}.x)",
                source=source,
                position=f"data point {index}",
                field="header/schema_id/version",
            )
        err = _first_error(v[name], point["body"])
        if err is not None:
            path = "/".join(["body", *(str(p) for p in err.absolute_path)])
            raise ParseError(f"body does not follow {ns}:{name}:{version}: {err.message[:200]}", source=source, position=f"data point {index}", field=path)
    return ns, name, version


def _point_time(body: dict[str, Any], *, end_offset_ms: float | None) -> tuple[str | None, float]:
    """(ISO time string, milliseconds to add) for a data point; None if it has no usable time."""
    frame = body.get("effective_time_frame") or {}
    if "date_time" in frame:
        return frame["date_time"], 0.0
    ti = frame.get("time_interval") or {}
    if "end_date_time" in ti:
        return ti["end_date_time"], 0.0
    if "start_date_time" in ti:
        dur = ti.get("duration")
        if isinstance(dur, dict):
            scale = {"ps": 1e-9, "ns": 1e-6, "us": 1e-3, "ms": 1.0, "sec": 1e3, "min": 6e4, "h": 3.6e6, "d": 8.64e7}
            if dur.get("unit") in scale:
                return ti["start_date_time"], float(dur["value"]) * scale[dur["unit"]]
        if end_offset_ms is not None:
            return ti["start_date_time"], end_offset_ms
    return None, 0.0


EXPORT_SAMPLE_FORMATS = ("openmhealth", "stresswatch-samples-v1")


@dataclass(frozen=True)
class OmhDocument:
    """What one input holds: validated data points, and, when the input is a ``stresswatch
    export`` document, the plain sample rows it carries beside them (metrics without an Open
    mHealth schema, or every sample of an export written without the OMH writer)."""

    points: list[dict[str, Any]]
    plain_rows: list[dict[str, Any]]
    from_export: bool


def parse_omh(data: bytes, *, source: str = "openmhealth", ndjson: bool = False) -> tuple[list[dict[str, Any]], int]:
    """JSON bytes -> (valid data points, count). Pure. Raises only :class:`ParseError`."""
    doc = parse_omh_document(data, source=source, ndjson=ndjson)
    return doc.points, len(doc.points)


def _export_parts(doc: dict[str, Any], source: str) -> tuple[list[Any], list[Any]]:
    """(data points, plain rows) of a ``stresswatch export`` document (docs/CONSENT.md)."""
    fmt = doc.get("samples_format")
    if fmt not in EXPORT_SAMPLE_FORMATS:
        raise ParseError(f"unknown samples_format {fmt!r} (known: {', '.join(EXPORT_SAMPLE_FORMATS)})", source=source, field="samples_format")
    parts = []
    for key in ("samples", "other_samples"):
        items = doc.get(key, [])
        if not isinstance(items, list):
            raise ParseError("expected a list", source=source, field=key)
        parts.append(items)
    points, plain = parts
    if fmt != "openmhealth":  # every sample is a plain row
        points, plain = [], points + plain
    for i, row in enumerate(plain):
        if not isinstance(row, dict) or not all(k in row for k in ("time", "metric", "value")):
            raise ParseError("a sample row needs time, metric and value", source=source, position=f"row {i}", field="other_samples")
    return points, plain


def parse_omh_document(data: bytes, *, source: str = "openmhealth", ndjson: bool = False) -> OmhDocument:
    """JSON bytes -> :class:`OmhDocument`: one data point, a list of them, newline-delimited
    data points, or a ``stresswatch export`` document (read back as it is written). Pure.
    Raises only :class:`ParseError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"not UTF-8 text: {exc.reason}", source=source, position=f"byte {exc.start}") from None
    points: list[Any] = []
    try:
        if ndjson:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        points.append(json.loads(line))
                    except ValueError as exc:
                        raise ParseError(f"not valid JSON: {exc}", source=source, position=f"line {lineno}") from None
        else:
            doc = json.loads(text)
            points = doc if isinstance(doc, list) else [doc]
    except ValueError as exc:
        pos = getattr(exc, "lineno", None)
        raise ParseError(f"not valid JSON: {getattr(exc, 'msg', exc)}", source=source, position=f"line {pos}" if pos else None) from None
    except RecursionError:
        raise ParseError("JSON nested too deeply", source=source) from None
    plain: list[Any] = []
    from_export = len(points) == 1 and isinstance(points[0], dict) and "header" not in points[0] and "samples_format" in points[0]
    if from_export:
        points, plain = _export_parts(points[0], source)
    for i, point in enumerate(points):
        validate_data_point(point, source=source, index=i)
    return OmhDocument(points, plain, from_export)


class OpenMHealthSource(ExportSource):
    """``stresswatch import openmhealth PATH``: *.json / *.ndjson / *.jsonl, a folder or a zip."""

    kind: ClassVar[str] = "openmhealth"
    suffixes: ClassVar[tuple[str, ...]] = (".omh.json", ".ndjson", ".jsonl")
    what: ClassVar[str] = "Open mHealth JSON (*.json, *.ndjson, *.jsonl)"

    @classmethod
    def accept(cls, name: str) -> bool:
        return name.lower().endswith((".json", ".ndjson", ".jsonl"))

    def parse(self, inp: InputFile) -> Iterator[pl.DataFrame]:
        doc = parse_omh_document(inp.read_bytes(), source=inp.name, ndjson=inp.name.lower().endswith((".ndjson", ".jsonl")))
        points = doc.points
        self.report.read += len(points) + len(doc.plain_rows)
        times: list[str | None] = []
        offsets: list[float] = []
        metrics: list[str] = []
        values: list[float] = []
        sources: list[str] = []
        for row in doc.plain_rows:
            times.append(row["time"] if isinstance(row["time"], str) else None)
            offsets.append(0.0)
            metrics.append(str(row["metric"]))
            try:
                values.append(float(row["value"]))
            except (TypeError, ValueError):
                values.append(float("nan"))
            sources.append(str(row.get("source") or "openmhealth"))
        for point in points:
            sid = point["header"]["schema_id"]
            name = sid["name"] if sid["namespace"] == "omh" else None
            body = point["body"]
            if name == "heart-rate":
                t, off = _point_time(body, end_offset_ms=None)
                value, metric = body["heart_rate"]["value"], "hr_bpm"
            elif name == "rr-interval":
                value, metric = body["rr_interval"]["value"], "rr_ms"
                t, off = _point_time(body, end_offset_ms=float(value))
            else:
                self.report.reject(f"openmhealth: schema {sid['namespace']}:{sid['name']}:{sid['version']} is not heart-rate or rr-interval")
                continue
            if t is None:
                self.report.reject(f"openmhealth {name}: no point in time in effective_time_frame")
                continue
            times.append(t)
            offsets.append(off)
            metrics.append(metric)
            values.append(float(value))
            sources.append(_provenance(point) if doc.from_export else "openmhealth")
        n_ok = len(times)
        parsed = parse_times(pl.Series(times, dtype=pl.String), "UTC")
        frame = pl.DataFrame(
            {
                "user": pl.repeat(self.user, n_ok, dtype=pl.String, eager=True),
                "time": parsed + (pl.Series(offsets, dtype=pl.Float64) * 1e6).round(0).cast(pl.Int64).cast(pl.Duration("ns")),
                "metric": pl.Series(metrics, dtype=pl.String),
                "value": pl.Series(values, dtype=pl.Float64),
                "source": pl.Series(sources, dtype=pl.String),
            }
        )
        bad = pl.col("time").is_null()
        k = int(frame.select(bad.sum()).item())
        if k:
            self.report.reject("openmhealth: date_time does not parse", k)
            frame = frame.filter(~bad)
        unknown = ~pl.col("metric").is_in(list(METRICS))
        k = int(frame.select(unknown.sum()).item())
        if k:
            self.report.reject("openmhealth export: unknown metric", k)
            frame = frame.filter(~unknown)
        yield plausible(frame, self.report, label="openmhealth").select(list(SAMPLES_SCHEMA)).sort("time", maintain_order=True)


def _provenance(point: dict[str, Any]) -> str:
    """The stresswatch source a data point of an export names (:func:`to_omh`), else "openmhealth"."""
    name = (point["header"].get("acquisition_provenance") or {}).get("source_name")
    return name if isinstance(name, str) and 0 < len(name) <= 64 else "openmhealth"


def _iso(col: pl.Expr) -> pl.Expr:
    return col.dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ")


def to_omh(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Samples -> Open mHealth data points (heart-rate 2.0 for hr_bpm, rr-interval 1.0 for rr_ms).

    Rows of other metrics are left out. Each point validates against the schemas
    (:func:`validate_data_point`); its ``uuid`` is derived from the sample, so the same
    samples always give the same points.
    """
    rows = frame.filter(pl.col("metric").is_in(["hr_bpm", "rr_ms"])).with_columns(_iso(pl.col("time")).alias("_iso"))
    out: list[dict[str, Any]] = []
    for user, iso, metric, value, source in rows.select("user", "_iso", "metric", "value", "source").iter_rows():
        ns, name, version = HEART_RATE if metric == "hr_bpm" else RR_INTERVAL
        header = {
            "uuid": str(uuid.uuid5(_NAMESPACE, f"{user}|{iso}|{metric}|{value!r}|{source}")),
            "schema_id": {"namespace": ns, "name": name, "version": version},
            "source_creation_date_time": iso,
            "modality": "sensed",
            # which device or export it came from (no name, no address): read back on import
            "acquisition_provenance": {"source_name": source},
        }
        if metric == "hr_bpm":
            body: dict[str, Any] = {
                "heart_rate": {"value": value, "unit": "beats/min"},
                "effective_time_frame": {"date_time": iso},
            }
        else:
            body = {
                "rr_interval": {"value": value, "unit": "ms"},
                "effective_time_frame": {"time_interval": {"end_date_time": iso, "duration": {"value": value, "unit": "ms"}}},
            }
        out.append({"header": header, "body": body})
    return out
