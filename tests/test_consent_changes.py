"""A consent change that changes nothing is refused and writes nothing; the state a user is
shown names recipients only while someone can be alerted."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stresswatch.cli import main
from stresswatch.consent.ledger import ConsentLedger
from stresswatch.consent.state import Action, ConsentEvent, Status, decide_change, fold
from stresswatch.errors import ConsentError

T = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
ACTIONS = [Action.GRANT, Action.PAUSE, Action.RESUME, Action.REVOKE]


def _event(action: Action, i: int) -> ConsentEvent:
    return ConsentEvent("alice", action, T + timedelta(minutes=i), "cli", recipients=("sam",) if action is Action.GRANT else ())


@given(st.lists(st.sampled_from(ACTIONS), max_size=12), st.sampled_from(ACTIONS))
def test_an_action_is_allowed_exactly_when_it_changes_the_state(history, action):
    events = [_event(a, i) for i, a in enumerate(history)]
    before = fold("alice", events)
    now = T + timedelta(minutes=len(events))
    after = fold("alice", [*events, _event(action, len(events))])
    decision = decide_change(before, action, now)
    # "never granted" and "revoked" both let no one be alerted: a revoke of nothing changes nothing
    same = {Status.NONE: Status.REVOKED}
    key = lambda s: (same.get(s.status, s.status), s.recipients)  # noqa: E731
    changed = key(after) != key(before) or action is Action.GRANT
    assert decision.allowed == changed, (history, action, decision)
    if not decision.allowed:
        assert decision.reason and "\n" not in decision.reason


def test_resume_after_revoke_is_refused_with_a_hint_to_grant_again_and_writes_nothing(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        ledger.grant("alice", ["sam"], now=T)
        ledger.revoke("alice", now=T)
        with pytest.raises(ConsentError, match="revoked.*consent grant --user alice"):
            ledger.resume("alice", now=T)
        with pytest.raises(ConsentError, match="already revoked"):
            ledger.revoke("alice", now=T)
        with pytest.raises(ConsentError, match="revoked"):
            ledger.pause("alice", now=T)
        assert [e.action for e in ledger.events("alice")] == [Action.GRANT, Action.REVOKE]
        assert ledger.state("alice").status is Status.REVOKED


def test_pause_without_consent_and_a_second_pause_are_refused(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        with pytest.raises(ConsentError, match="no consent to pause"):
            ledger.pause("bob", now=T)
        assert ledger.events("bob") == []
        ledger.grant("bob", ["sam"], now=T, expires_at=T + timedelta(days=1))
        ledger.pause("bob", now=T)
        with pytest.raises(ConsentError, match="already paused"):
            ledger.pause("bob", now=T)
        ledger.resume("bob", now=T)
        with pytest.raises(ConsentError, match="not paused"):
            ledger.resume("bob", now=T)
        with pytest.raises(ConsentError, match="expired"):
            ledger.pause("bob", now=T + timedelta(days=2))
        assert [e.action for e in ledger.events("bob")] == [Action.GRANT, Action.PAUSE, Action.RESUME]


def cli(home, capsys, *args):
    rc = main(["--set", f"store.state_dir={home}", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_refuses_no_ops_with_one_line_and_show_after_revoke_names_no_recipient(tmp_path, capsys):
    home = tmp_path / "home"
    rc, out, err = cli(home, capsys, "consent", "pause", "--user", "alice")
    assert rc != 0 and "no consent to pause" in err and len(err.strip().splitlines()) == 1
    assert cli(home, capsys, "consent", "grant", "--user", "alice", "--to", "sam", "--yes")[0] == 0
    assert cli(home, capsys, "consent", "revoke", "--user", "alice")[0] == 0
    rc, out, err = cli(home, capsys, "consent", "resume", "--user", "alice")
    assert rc != 0 and "revoked" in err and "consent grant" in err
    rc, out, err = cli(home, capsys, "consent", "revoke", "--user", "alice")
    assert rc != 0 and "already revoked" in err
    rc, out, err = cli(home, capsys, "consent", "show", "--user", "alice")
    assert rc == 0 and "revoked" in out and "sam" not in out and "see" not in out
    rc, out, err = cli(home, capsys, "consent", "history", "--user", "alice")
    assert out.count("revoke") == 1 and "resume" not in out


def test_until_in_the_past_is_refused_before_the_consent_text_is_shown(tmp_path, capsys):
    home = tmp_path / "home"
    rc, out, err = cli(home, capsys, "consent", "grant", "--user", "alice", "--to", "sam", "--until", "2020-01-01")
    assert rc != 0 and "in the past" in err
    assert "Consent text" not in out and "Do you agree" not in out
    assert cli(home, capsys, "consent", "history", "--user", "alice")[1].count("grant") == 0
