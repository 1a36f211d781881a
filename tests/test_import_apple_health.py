"""Apple Health export.xml: streamed, locale time formats, RR from beat lists, zip and folder."""

from __future__ import annotations

import zipfile
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from stresswatch.errors import ParseError
from stresswatch_adapters import apple_health
from stresswatch_adapters.apple_health import AppleHealthParser, AppleHealthSource, parse_time_of_day

EXPORT = Path(__file__).resolve().parent.parent / "fixtures" / "apple_health" / "export.xml"
UTC = timezone.utc


def load(path: Path) -> tuple[pl.DataFrame, AppleHealthSource]:
    src = AppleHealthSource(path, user="erin")
    return pl.concat(list(src.batches())).sort("time"), src


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("6:14:48.94 PM", 65688.94),
        ("6:14:48.94\u202fPM", 65688.94),  # narrow no-break space (iOS 17+ en_US)
        ("6:14:48.94\xa0pm", 65688.94),
        ("18:14:48,94", 65688.94),  # de_DE
        ("午後6:14:48.94", 65688.94),  # ja_JP
        ("12:00:01.5 AM", 1.5),
        ("12:00:01 PM", 43201.0),
        ("0:00:00,52", 0.52),
    ],
)
def test_locale_time_of_day(text: str, seconds: float):
    assert parse_time_of_day(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["seven thirty", "25:00:00", "13:00:00 PM", "", "6:14 PM"])
def test_time_of_day_that_does_not_parse(text: str):
    assert parse_time_of_day(text) is None


def test_heart_rates_and_rr_from_beat_lists():
    got, src = load(EXPORT)
    hr = got.filter(pl.col("metric") == "hr_bpm")
    assert hr["time"].to_list() == [datetime(2022, 12, 1, 7, 0, 2, tzinfo=UTC), datetime(2022, 12, 1, 7, 5, 2, tzinfo=UTC)]
    assert hr["value"].to_list() == [62.0, 64.5]
    rr = got.filter(pl.col("metric") == "rr_ms")
    assert rr["value"].round(6).to_list() == [940.0, 950.0, 980.0, 1000.0, 1020.0, 1000.0, 850.0, 850.0, 850.0]
    # the interval's time is the beat that ends it; the midnight-crossing record lands on 2 Dec local
    assert rr["time"][0] == datetime(2022, 12, 1, 17, 14, 49, 880000, tzinfo=UTC)
    assert rr["time"][4] == datetime(2022, 12, 1, 23, 0, 0, 520000, tzinfo=UTC)
    assert set(got["source"]) == {"apple_health/Watch6,1"}  # hardware, never the person-named sourceName
    assert src.report.rejected == {
        "apple_health heart rate: unit 'count/s' is not count/min": 1,
        "apple_health heart rate: value is not a number": 1,
        "apple_health heart rate: startDate does not parse": 1,
        "apple_health: heart rate outside 20-250 bpm": 1,
        "apple_health beat: time of day or record startDate does not parse": 1,
        "apple_health: RR interval outside 200-3000 ms": 1,  # the 4 s gap is not one interval
    }
    assert src.report.read == src.report.kept + src.report.n_rejected


def test_zip_and_folder_read_export_xml_only(tmp_path: Path):
    z = tmp_path / "export.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(EXPORT, "apple_health_export/export.xml")
        zf.writestr("apple_health_export/export_cda.xml", "<ClinicalDocument/>")
    assert load(z)[0].equals(load(EXPORT)[0])
    folder = tmp_path / "apple_health_export"
    folder.mkdir()
    (folder / "export.xml").write_bytes(EXPORT.read_bytes())
    (folder / "export_cda.xml").write_text("<ClinicalDocument/>")
    assert load(folder)[0].equals(load(EXPORT)[0])


def test_chunks_are_bounded_and_concatenate_to_the_whole(monkeypatch: pytest.MonkeyPatch):
    whole, _ = load(EXPORT)
    monkeypatch.setattr(apple_health, "CHUNK_ROWS", 1)
    monkeypatch.setattr(apple_health, "READ_BYTES", 64)
    src = AppleHealthSource(EXPORT, user="erin")
    chunks = list(src.batches())
    assert len(chunks) > 3
    assert pl.concat(chunks).sort("time").equals(whole)


def test_truncated_export_names_line_and_column():
    data = EXPORT.read_bytes()
    p = AppleHealthParser(source="export.xml")
    p.feed(data[: len(data) - 200])
    with pytest.raises(ParseError) as err:
        p.close()
    assert err.value.source == "export.xml" and str(err.value.position).startswith("line ")


def test_other_xml_is_not_an_export():
    p = AppleHealthParser(source="x.xml")
    with pytest.raises(ParseError, match="root element <ClinicalDocument>"):
        p.feed(b"<?xml version='1.0'?><ClinicalDocument><x/></ClinicalDocument>")
