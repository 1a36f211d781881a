"""Fitbit export: local times in --tz (with DST), newer CSVs, HRV details reported, not stored."""

from __future__ import annotations

import zipfile
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from stresswatch.errors import ParseError
from stresswatch_adapters.fitbit import FitbitSource, parse_fitbit_json

EXPORT = Path(__file__).resolve().parent.parent / "fixtures" / "fitbit" / "export"
UTC = timezone.utc


def load(path: Path, tz: str | None = "Europe/Berlin") -> tuple[pl.DataFrame, FitbitSource]:
    src = FitbitSource(path, user="dana", tz=tz)
    return pl.concat(list(src.batches())).sort("time"), src


def test_json_local_times_follow_the_time_zone_across_the_dst_jump():
    got, src = load(EXPORT / "Physical Activity" / "heart_rate-2026-03-29.json")
    assert got["time"].to_list() == [
        datetime(2026, 3, 29, 0, 59, 55, tzinfo=UTC),  # 01:59:55 CET
        datetime(2026, 3, 29, 1, 0, 5, tzinfo=UTC),  # 03:00:05 CEST
        datetime(2026, 3, 29, 1, 0, 10, tzinfo=UTC),
    ]
    assert got["value"].to_list() == [61.0, 63.0, 64.0]  # confidence 0 is kept
    assert src.report.rejected == {
        "fitbit json: time does not parse or does not exist in --tz": 2,  # 02:30 skipped hour; 13/45
        "fitbit json: heart rate outside 20-250 bpm": 1,
        "fitbit json: entry without dateTime or value.bpm": 1,
    }
    assert src.report.read == 7


def test_default_time_zone_is_utc():
    got, _ = load(EXPORT / "Physical Activity" / "heart_rate-2026-03-29.json", tz=None)
    assert got["time"][0] == datetime(2026, 3, 29, 1, 59, 55, tzinfo=UTC)


def test_newer_csv_keeps_explicit_offsets_and_localises_naive_times():
    got, src = load(EXPORT / "Physical Activity" / "heart_rate_2026-03-30.csv")
    assert got["time"].to_list() == [
        datetime(2026, 3, 30, 6, 0, 15, tzinfo=UTC),
        datetime(2026, 3, 30, 8, 0, 0, tzinfo=UTC),
        datetime(2026, 3, 30, 8, 0, 5, tzinfo=UTC),  # 10:00:05 CEST
    ]
    assert set(got["source"]) == {"fitbit/wrist"}
    assert src.report.rejected == {
        "fitbit csv: time does not parse or does not exist in --tz": 1,
        "fitbit csv: heart rate is empty or not a number": 1,
    }


def test_hrv_details_are_read_and_reported_as_rejected_with_the_reason():
    got, src = load(EXPORT)
    assert got.height == 6  # 3 from json, 3 from csv; no RMSSD rows, steps file ignored
    assert src.report.rejected["fitbit hrv details: RMSSD summaries are not samples (no metric for them)"] == 3
    assert not any("steps" in f for f in src.report.files)
    assert src.report.read == src.report.kept + src.report.n_rejected


def test_zip_equals_folder(tmp_path: Path):
    z = tmp_path / "MyFitbitData.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in EXPORT.rglob("*"):
            if p.is_file():
                zf.write(p, "MyFitbitData/User/" + p.relative_to(EXPORT).as_posix())
    assert load(z)[0].equals(load(EXPORT)[0])


def test_hrv_file_with_wrong_columns_names_the_missing_one(tmp_path: Path):
    f = tmp_path / "Heart Rate Variability Details - 2026-01-01.csv"
    f.write_text("time,rmssd\n2026-01-01T00:00:00,30\n")
    with pytest.raises(ParseError) as err:
        load(f)
    assert err.value.field == "timestamp" and err.value.position == "line 1"


def test_not_a_list_is_an_error():
    with pytest.raises(ParseError, match="expected a JSON list"):
        parse_fitbit_json(b'{"dateTime": "x"}', source="heart_rate-2026-01-01.json")
    with pytest.raises(ParseError, match="not valid JSON"):
        parse_fitbit_json(b'[{"dateTime": ', source="heart_rate-2026-01-01.json")


def test_empty_folder_says_what_it_looked_for(tmp_path: Path):
    with pytest.raises(ParseError, match="no Fitbit heart-rate files"):
        load(tmp_path)
