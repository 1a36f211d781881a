"""Ids: one grammar (stresswatch.ids), and every command that takes an id refuses a bad one
with one line and exit 78, before touching anything: never a traceback."""

from __future__ import annotations

import re

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stresswatch.cli import cli, main
from stresswatch.ids import ID_MAX_LEN, InvalidIdError, validate_id

GRAMMAR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
INVALID = ["sam/#", "", "-x", ".hidden", "a b", "sam+", "x" * (ID_MAX_LEN + 1), "al\u00efce", "a\nb", "x:y"]


@given(st.text(max_size=80))
def test_validate_id_accepts_exactly_the_grammar_and_raises_only_invalid_id(value):
    try:
        assert validate_id("user", value) == value
        ok = True
    except InvalidIdError as exc:
        ok = False
        assert "\n" not in str(exc) and "user id" in str(exc)
    assert ok == (GRAMMAR.fullmatch(value) is not None)


@pytest.mark.parametrize("value", ["alice", "team-north", "a.b_c-1", "_x", "9", "x" * ID_MAX_LEN])
def test_ordinary_ids_pass(value):
    assert validate_id("worker", value) == value


# Each command that takes an id, with the least else it needs; ID marks where the id goes.
ID = object()
ID_COMMANDS: dict[tuple[str, ...], list[object]] = {
    ("consent", "grant"): ["--user", ID, "--to", "sam", "--yes"],
    ("consent", "grant", "--to"): ["--user", "alice", "--to", ID, "--yes"],
    ("consent", "pause"): ["--user", ID],
    ("consent", "resume"): ["--user", ID],
    ("consent", "revoke"): ["--user", ID],
    ("consent", "show"): ["--user", ID],
    ("consent", "history"): ["--user", ID],
    ("import",): ["fit", "{file}", "--user", ID],
    ("export",): ["--user", ID],
    ("erase",): ["--user", ID, "--yes"],
    ("alerts", "watch"): ["--worker", ID, "--broker", "mqtt://127.0.0.1:9"],
    ("alerts", "ack"): ["00000000-0000-4000-8000-000000000000", "--worker", ID, "--broker", "mqtt://127.0.0.1:9"],
    ("alerts", "resolve"): ["00000000-0000-4000-8000-000000000000", "--worker", ID, "--outcome", "reached_out", "--broker", "mqtt://127.0.0.1:9"],
    ("alerts", "list"): ["--worker", ID, "--broker", "mqtt://127.0.0.1:9"],
    ("checkin",): ["--user", ID, "--broker", "mqtt://127.0.0.1:9"],
    ("pair",): ["--user", ID, "--replay", "{file}"],
    ("stream",): ["--user", ID, "--drain-only"],
    ("record",): ["--user", ID, "--replay", "{file}"],
    ("broker", "add-user"): ["--dir", "{dir}", "--", ID],
    ("broker", "add-worker"): ["--dir", "{dir}", "--", ID],
}
ID_PARAMS = {"user", "recipients", "worker", "user_id", "worker_id"}


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_the_sweep_covers_every_command_that_takes_an_id():
    taking = {path for path, cmd in _commands(cli) if any(p.name in ID_PARAMS for p in cmd.params)}
    covered = {k if k[-1] != "--to" else k[:-1] for k in ID_COMMANDS}
    assert taking <= covered, f"add these commands to ID_COMMANDS: {sorted(taking - covered)}"


@pytest.mark.parametrize("path", list(ID_COMMANDS), ids=lambda p: " ".join(p))
@pytest.mark.parametrize("bad", INVALID, ids=repr)
def test_every_command_refuses_an_invalid_id_in_one_line(path, bad, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STRESSWATCH_STORE__STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "f.fit").write_bytes(b"not a fit file")
    words = [w for w in path if not w.startswith("--")]
    args = [
        bad if a is ID else str(a).format(file=tmp_path / "f.fit", dir=tmp_path / "broker")
        for a in ID_COMMANDS[path]
    ]
    rc = main([*words, *args])
    err = capsys.readouterr().err
    assert rc == 78, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stresswatch: error: ") and " id " in lines[0], err
    assert not (tmp_path / "state").exists()  # refused before anything was opened or written
