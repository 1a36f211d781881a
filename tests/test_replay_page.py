"""What the replay output says on the page: which baseline is drawn, and that without a
consent database no alert counts as consented (rather than "0 consented")."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from PIL import Image

from stresswatch.cli import main
from stresswatch.plot import own_slot, page_notes


def test_replay_plot_says_which_baseline_it_draws_and_that_no_consent_db_was_given(demo_cohort: Path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["replay", str(demo_cohort), "--out", str(out), "--plot"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "no --consent-db given" in printed and "0 consented" not in printed
    windows = pl.read_parquet(out / "windows.parquet").filter(pl.col("user") == "alice")
    neighbour = int((windows["baseline_slot"] != own_slot(windows["window_start"], 4)).sum())
    assert neighbour > 0  # the night of alice's second day is compared with a waking slot
    png = Image.open(out / "plots" / "alice.png")
    assert "consent unknown (no --consent-db)" in png.text["Title"]
    assert f"{neighbour} window(s) were compared with a neighbouring slot's baseline" in png.text["Description"]
    assert "No consent database given" in png.text["Description"]


def test_with_a_consent_db_the_page_counts_consented_alerts(demo_cohort: Path, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["--set", f"store.state_dir={home}", "consent", "grant", "--user", "alice", "--to", "sam", "--yes"]) == 0
    out = tmp_path / "out"
    assert main(["replay", str(demo_cohort), "--out", str(out), "--plot", "--consent-db", str(home / "stresswatch.sqlite")]) == 0
    assert "1 consented" in " ".join(capsys.readouterr().out.split())
    png = Image.open(out / "plots" / "alice.png")
    assert "1 consented" in png.text["Title"] and "No consent database" not in png.text["Description"]


def test_page_notes_without_neighbour_windows_say_every_window_used_its_own_slot():
    w = pl.DataFrame(
        {"window_start": pl.Series(["2026-03-02T13:00:00"]).str.to_datetime(time_zone="UTC"), "baseline_slot": [2]}
    )
    note, n = page_notes(w, baseline_slots=4, consent_given=True)
    assert n == 0 and "Every window was compared with its own slot" in note
