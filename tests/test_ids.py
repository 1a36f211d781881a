"""Every command that takes an id checks it with the one grammar (stresswatch.wire.ids) and
refuses a bad one with one line and the InvalidId exit code, before touching anything: never
a traceback."""

from __future__ import annotations

import click
import pytest

from stresswatch.cli import cli, main
from stresswatch.errors import ConfigError, InvalidId

INVALID = ["sam/#", "", "-x", ".hidden", "a b", "sam+", "x" * 65, "al\u00efce", "a\nb", "x:y"]


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
    # broker accounts are configuration (ConfigError, 78); every other id is input (InvalidId)
    assert rc == (ConfigError.exit_code if path[0] == "broker" else InvalidId.exit_code), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stresswatch: error: ") and " id " in lines[0], err
    assert not (tmp_path / "state").exists()  # refused before anything was opened or written
