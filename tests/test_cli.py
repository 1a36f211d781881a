"""The CLI as a user runs it: a real subprocess, exit codes, one-line errors, Parquet out."""

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from stresswatch.cli import cli
from stresswatch.model import WINDOW_SCHEMA


def run(*args: str, env_home: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if env_home is not None:
        import os

        env = {**os.environ, "STRESSWATCH_STORE__STATE_DIR": str(env_home)}
    return subprocess.run(
        [sys.executable, "-m", "stresswatch.cli", *args], capture_output=True, text=True, timeout=120, env=env, input=input
    )


def all_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [(), *all_commands(cli)], ids=lambda p: " ".join(p) or "stresswatch")
def test_every_command_has_help_with_an_example(path):
    res = run(*path, "--help")
    assert res.returncode == 0, res.stderr
    assert "Examples:" in res.stdout and "stresswatch " in res.stdout.split("Examples:")[1]


def test_replay_writes_spec_tables(tmp_path: Path, demo_cohort: Path):
    res = run("replay", str(demo_cohort), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    w = pl.read_parquet(tmp_path / "out" / "windows.parquet")
    for col in ("user", "window_start", "window_end", "n_beats", "coverage", "hr_mean", "rmssd_ms", "sdnn_ms", "pnn50", "score", "state"):
        assert col in w.columns
    assert w.schema == pl.Schema(WINDOW_SCHEMA)
    a = pl.read_parquet(tmp_path / "out" / "alerts.parquet")
    assert sorted(a["user"]) == ["alice", "carol"]
    assert not a["sent"].any()  # no ledger given: no one consented
    assert set(a["consent"]) == {"withheld_no_consent"}


def test_replay_marks_consented_alerts(tmp_path: Path, demo_cohort: Path):
    home = tmp_path / "home"
    assert run("consent", "grant", "--user", "alice", "--to", "sam", "--yes", env_home=home).returncode == 0
    res = run("replay", str(demo_cohort), "--out", str(tmp_path / "out"), "--consent-db", str(home / "stresswatch.sqlite"))
    assert res.returncode == 0, res.stderr
    a = pl.read_parquet(tmp_path / "out" / "alerts.parquet").sort("user")
    assert a["sent"].to_list() == [True, False]
    assert a["recipients"].to_list() == [["sam"], []]


def test_replay_expands_a_group_and_records_each_member_once(tmp_path: Path, demo_cohort: Path):
    home = tmp_path / "home"
    config = tmp_path / "groups.toml"
    config.write_text('[groups]\nteam-north = ["kim", "lee"]\n')
    grant = run("consent", "grant", "--user", "alice", "--to", "sam", "--to", "team-north", "--yes", env_home=home)
    assert grant.returncode == 0, grant.stderr
    res = run(
        "replay", str(demo_cohort), "--out", str(tmp_path / "out"), "--consent-db", str(home / "stresswatch.sqlite"),
        "--config", str(config),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    a = pl.read_parquet(tmp_path / "out" / "alerts.parquet").sort("user")
    # sam first; not acknowledged (a replay acknowledges nothing), the alert escalates to the group's members
    assert a["recipients"].to_list() == [["sam", "kim", "lee"], []]
    assert a["consent"].to_list() == ["send", "withheld_no_consent"]


def test_bad_input_gives_one_line_and_nonzero_exit_and_keeps_old_output(tmp_path: Path, demo_cohort: Path):
    out = tmp_path / "out"
    assert run("replay", str(demo_cohort), "--out", str(out)).returncode == 0
    before = (out / "windows.parquet").read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("user,time,metric,value,source\na,2026-03-02T00:00:01Z,rr_ms,x,s\n")
    res = run("replay", str(bad), "--out", str(out))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.csv:line 2" in lines[0] and "value" in lines[0]
    assert "Traceback" not in res.stderr
    assert (out / "windows.parquet").read_bytes() == before


def test_bad_setting_names_the_field(demo_cohort: Path, tmp_path: Path):
    res = run("--set", "detector.window_s=abc", "replay", str(demo_cohort), "--out", str(tmp_path))
    assert res.returncode != 0 and "detector.window_s" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_consent_grant_asks_then_revoke_is_one_command(tmp_path: Path):
    home = tmp_path / "home"
    declined = run("consent", "grant", "--user", "alice", "--to", "sam", env_home=home, input="n\n")
    assert declined.returncode != 0
    assert "no consent recorded" in run("consent", "show", "--user", "alice", env_home=home).stdout
    assert run("consent", "grant", "--user", "alice", "--to", "sam", env_home=home, input="y\n").returncode == 0
    assert "active" in run("consent", "show", "--user", "alice", env_home=home).stdout
    assert run("consent", "revoke", "--user", "alice", env_home=home).returncode == 0
    hist = run("consent", "history", "--user", "alice", env_home=home).stdout
    assert "grant" in hist and "revoke" in hist
