"""What `stresswatch replay` reads: an import's store folder, a table with the import's
reading options, a table of seconds from the start of a recording, and the lab-length
settings docs/REPLAY.md gives (run here exactly as written there)."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from stresswatch.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def test_replay_reads_the_store_folder_an_import_wrote(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["import", "fit", str(FIXTURES / "fit" / "monitoring.fit"), "--user", "alice", "--out", str(store)]) == 0
    for folder in (store, store / "samples"):
        out = tmp_path / f"out-{folder.name}"
        rc = main(["replay", str(folder), "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        w = pl.read_parquet(out / "windows.parquet")
        assert w.height > 0 and set(w["user"]) == {"alice"}


def test_a_folder_without_a_store_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["replay", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 65
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kind" in err


def lab_recording(path: Path) -> Path:
    """An hour in a lab: 20 min rest, 10 min stressor (HR up, HRV down), 30 min recovery; times
    in seconds from the start of the recording, as lab software writes them."""
    rng = np.random.default_rng(7)
    t, ts, rrs = 0.0, [], []
    while t < 3600:
        stress = 1200 <= t < 1800
        rr = 800 + rng.normal(0, 4) if stress else 1000 + rng.normal(0, 60)
        t += rr / 1000
        ts.append(round(t, 3))
        rrs.append(round(rr, 1))
    pl.DataFrame({"t_s": ts, "rr": rrs}).write_csv(path)
    return path


def test_table_options_and_start_time_put_relative_times_at_the_recording_start(tmp_path, capsys):
    lab = lab_recording(tmp_path / "lab.csv")
    # the error's advice (--map) is an option replay has
    assert main(["replay", str(lab), "--kind", "table", "--out", str(tmp_path / "o0")]) == 65
    assert "--map time=COLUMN" in capsys.readouterr().err
    common = ["replay", str(lab), "--kind", "table", "--map", "time=t_s", "--map", "value=rr", "--metric", "rr_ms"]
    assert main([*common, "--out", str(tmp_path / "o1")]) == 0
    assert "windows start in 1970" in " ".join(capsys.readouterr().err.split())
    assert main([*common, "--start-time", "2026-11-20T09:30:00+01:00", "--out", str(tmp_path / "o2")]) == 0
    w = pl.read_parquet(tmp_path / "o2" / "windows.parquet")
    assert w["window_start"].min() == datetime(2026, 11, 20, 8, 30, tzinfo=timezone.utc)
    assert "1970" not in capsys.readouterr().err


def test_reading_options_need_a_kind(tmp_path, capsys):
    assert main(["replay", str(FIXTURES / "demo_cohort.parquet"), "--map", "time=t", "--out", str(tmp_path / "o")]) != 0
    assert "--kind" in capsys.readouterr().err


def _documented_lab_command() -> list[str]:
    text = (ROOT / "docs" / "REPLAY.md").read_text()
    block = text[text.index("    stresswatch replay lab.csv") :].split("\n\n")[0]
    return shlex.split(block.replace("\\\n", " "))[1:]  # without the program name


@pytest.mark.parametrize("documented", [True, False], ids=["REPLAY.md lab settings", "defaults"])
def test_the_documented_lab_settings_score_an_hour_and_the_defaults_do_not(documented, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lab_recording(tmp_path / "lab.csv")
    args = _documented_lab_command()
    if not documented:
        args = [a for i, a in enumerate(args) if a != "--set" and (i == 0 or args[i - 1] != "--set")]
    assert main(args) == 0, capsys.readouterr().err
    w = pl.read_parquet(tmp_path / "lab-out" / "windows.parquet")
    alerts = pl.read_parquet(tmp_path / "lab-out" / "alerts.parquet")
    states = dict(w.group_by("state").len().iter_rows())
    if not documented:
        assert w.height <= 13 and states.get("calibrating", 0) >= w.height - 1 and alerts.height == 0
        return
    assert w.height == 61 and states["calibrating"] == 10
    stressor = w.filter(pl.col("window_start").is_between(datetime(2026, 11, 20, 8, 50, tzinfo=timezone.utc), datetime(2026, 11, 20, 8, 59, tzinfo=timezone.utc)))
    assert (stressor["state"] == "elevated").sum() >= 8
    assert alerts.height == 1
    assert alerts["raised_at"][0] == datetime(2026, 11, 20, 8, 51, tzinfo=timezone.utc)  # the first stressor minute decides
