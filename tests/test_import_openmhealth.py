"""Open mHealth / IEEE 1752.1: in and out, validated against the schemas."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from stresswatch.errors import ParseError
from stresswatch_adapters.fit import FitSource
from stresswatch_adapters.openmhealth import OpenMHealthSource, parse_omh, to_omh, validate_data_point

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
POINTS = FIXTURES / "openmhealth" / "points.json"


def load(path: Path) -> tuple[pl.DataFrame, OpenMHealthSource]:
    src = OpenMHealthSource(path, user="fay")
    return pl.concat(list(src.batches())).sort("time", "metric"), src


def test_reads_heart_rate_and_rr_interval_points():
    got, src = load(POINTS)
    assert got.select("metric", "value").rows() == [("hr_bpm", 61.0), ("hr_bpm", 62.5), ("rr_ms", 812.0), ("rr_ms", 790.0)]
    assert [t.isoformat() for t in got["time"]] == [
        "2026-03-02T09:00:00+00:00",
        "2026-03-02T09:00:15+00:00",  # start (10:00:05+01:00) + 10 s
        "2026-03-02T09:00:20.812000+00:00",
        "2026-03-02T09:00:21.602000+00:00",  # the end of the interval
    ]
    assert src.report.rejected == {
        "openmhealth rr-interval: no point in time in effective_time_frame": 1,
        "openmhealth: schema omh:step-count:3.0 is not heart-rate or rr-interval": 1,
    }


def test_out_is_schema_valid_and_round_trips_through_in(tmp_path: Path):
    samples = pl.concat(list(FitSource(FIXTURES / "fit" / "hr_beats.fit", user="fay").batches()))
    points = to_omh(samples)
    assert len(points) == samples.height
    for i, p in enumerate(points):
        validate_data_point(p, index=i)
    assert to_omh(samples) == points  # deterministic ids
    assert len({p["header"]["uuid"] for p in points}) == len(points)
    f = tmp_path / "out.json"
    f.write_text(json.dumps(points))
    back, _ = load(f)
    assert back.select("time", "metric", "value").equals(samples.sort("time", "metric").select("time", "metric", "value"))


def test_ndjson(tmp_path: Path):
    f = tmp_path / "points.ndjson"
    f.write_text("\n".join(json.dumps(p) for p in json.loads(POINTS.read_text())) + "\n")
    assert load(f)[0].equals(load(POINTS)[0])


def test_schema_violation_names_data_point_and_path():
    points = json.loads(POINTS.read_text())
    points[2]["body"]["rr_interval"]["unit"] = "sec"
    with pytest.raises(ParseError) as err:
        parse_omh(json.dumps(points).encode(), source="p.json")
    assert err.value.position == "data point 2"
    assert err.value.field is not None and err.value.field.startswith("body/rr_interval")


def test_unknown_version_is_an_error():
    points = json.loads(POINTS.read_text())
    points[0]["header"]["schema_id"]["version"] = "3.0"
    with pytest.raises(ParseError, match="unsupported schema version omh:heart-rate:3.0"):
        parse_omh(json.dumps(points).encode(), source="p.json")


def test_missing_header_is_an_error():
    with pytest.raises(ParseError, match="IEEE 1752.1 data point"):
        parse_omh(b'[{"body": {}}]', source="p.json")
