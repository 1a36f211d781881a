"""`stresswatch alerts ack|resolve|list` report what the engine recorded (its reply on the
worker's replies topic), through the generated broker with real accounts and a real engine."""

from __future__ import annotations

import re

import pytest

from stresswatch.alerts.lifecycle import OPEN_STATES, AlertState
from stresswatch.alerts.outbox import Outbox
from stresswatch.cli import main

from conftest import wait_for
from engine_harness import engine_settings, publish_consent, running_engine


def as_account(b, account: str, *args: str) -> list[str]:
    return ["--set", f"mqtt.username={account}", "--set", f"mqtt.password={b.passwords[account]}", *args, "--broker", b.url]


def checkin(b, tmp_path, user: str, note: str) -> None:
    assert main(as_account(b, user, "checkin", "--user", user, "--note", note, "--queue-file", str(tmp_path / f"{user}-q.sqlite"))) == 0


@pytest.fixture
def engine_with_two_checkins(secure_broker, tmp_path):
    """alice chose sam; bob chose the group `team` (sam and kim). Each has checked in once."""
    b = secure_broker
    state = tmp_path / "engine"
    with running_engine(engine_settings(b, state, groups={"team": ["sam", "kim"]})):
        publish_consent(b, "alice", ["sam"], tmp_path, name="A.")
        publish_consent(b, "bob", ["team"], tmp_path, name="B.")
        checkin(b, tmp_path, "alice", "alice here")
        checkin(b, tmp_path, "bob", "bob here")
        with Outbox(state / "stresswatch.sqlite") as ob:
            assert wait_for(lambda: len(ob.records()) == 2 and all(r.targets for r in ob.records()), 20)
            ids = {r.user: r.alert_id for r in ob.records()}
        yield b, state, ids


def test_list_shows_a_worker_its_own_and_its_groups_alerts_with_ids(engine_with_two_checkins, capsys):
    b, _, ids = engine_with_two_checkins
    capsys.readouterr()
    assert main(as_account(b, "sam", "alerts", "list", "--worker", "sam")) == 0
    out = capsys.readouterr().out
    assert ids["alice"] in out and ids["bob"] in out and "A." in out and "self_report" in out
    assert main(as_account(b, "kim", "alerts", "list", "--worker", "kim", "--open")) == 0
    out = capsys.readouterr().out
    assert ids["bob"] in out and ids["alice"] not in out


def test_ack_and_resolve_print_the_state_the_engine_recorded(engine_with_two_checkins, capsys):
    b, state, ids = engine_with_two_checkins
    a = ids["alice"]
    assert main(as_account(b, "sam", "alerts", "ack", a, "--worker", "sam")) == 0
    assert re.search(rf"recorded {a}: acknowledged by sam", capsys.readouterr().out)
    assert main(as_account(b, "sam", "alerts", "ack", a, "--worker", "sam")) != 0  # twice: nothing new recorded
    assert "already acknowledged by sam" in capsys.readouterr().err
    assert main(as_account(b, "sam", "alerts", "resolve", a, "--worker", "sam", "--outcome", "reached_out", "--note", "called")) == 0
    assert "resolved by sam (reached_out)" in capsys.readouterr().out
    assert main(as_account(b, "sam", "alerts", "list", "--worker", "sam", "--open")) == 0
    assert a not in capsys.readouterr().out
    with Outbox(state / "stresswatch.sqlite") as ob:
        rec = ob.get(a)
    assert rec.state is AlertState.RESOLVED and rec.note == "called"


def test_what_the_engine_ignored_is_reported_as_not_recorded(engine_with_two_checkins, capsys):
    b, state, ids = engine_with_two_checkins
    a = ids["alice"]
    capsys.readouterr()
    # kim acks sam's alert with kim's own account: the engine refuses, and says so
    assert main(as_account(b, "kim", "alerts", "ack", a, "--worker", "kim")) != 0
    err = capsys.readouterr().err
    assert f"not recorded: no alert {a} for kim" in err and "Traceback" not in err
    # not a UUID: refused before it travels
    assert main(as_account(b, "sam", "alerts", "ack", "not-an-id", "--worker", "sam")) != 0
    assert "not a UUID" in capsys.readouterr().err
    # sam's account acting as kim: refused, nothing sent
    assert main(as_account(b, "sam", "alerts", "resolve", a, "--worker", "kim", "--outcome", "no_answer")) != 0
    assert "broker account is 'sam'" in capsys.readouterr().err
    with Outbox(state / "stresswatch.sqlite") as ob:
        assert ob.get(a).state in OPEN_STATES and ob.get(a).acked_by is None  # nothing recorded (delivered or, before its PUBACK, raised)


def test_without_an_engine_an_ack_is_not_reported_as_done(secure_broker, capsys):
    b = secure_broker
    rc = main(as_account(b, "sam", "alerts", "ack", "6f1c2d8e-4b7a-5c3e-9a1d-2e5f7b9c0a11", "--worker", "sam", "--timeout-s", "2"))
    assert rc != 0 and "the engine did not answer" in capsys.readouterr().err
