"""`stresswatch erase --broker` with the user's own account against the project's broker
(real Mosquitto, generated ACL): local data is erased whatever the broker says, and the
command reports what the broker part did."""

from __future__ import annotations

import sqlite3
import time

from test_broker_security import Inbox

from stresswatch.cli import main

P = "stresswatch/v1"
ENGINE = "stresswatch-engine"


def user_url(broker, account: str, password: str | None = None) -> str:
    return f"mqtt://{account}:{password or broker.passwords[account]}@127.0.0.1:{broker.port}"


def retained_consent(broker, user: str) -> list[bytes]:
    """What the engine would receive on start: the retained message of the user's consent topic."""
    inbox = Inbox(broker.url, ENGINE, broker.passwords[ENGINE], [f"{P}/consent/{user}"])
    try:
        time.sleep(0.7)
        return [p for p in inbox.payloads() if p]
    finally:
        inbox.close()


def consent_rows(home, user: str) -> int:
    con = sqlite3.connect(home / "stresswatch.sqlite")
    try:
        return con.execute("SELECT COUNT(*) FROM consent_events WHERE user = ?", (user,)).fetchone()[0]
    finally:
        con.close()


def test_erase_with_the_users_own_account_erases_locally_and_clears_the_consent_topic(secure_broker, tmp_path, capsys):
    b, home = secure_broker, tmp_path / "home"
    args = ["--set", f"store.state_dir={home}"]
    assert main([*args, "consent", "grant", "--user", "alice", "--to", "sam", "--yes", "--broker", user_url(b, "alice")]) == 0
    assert retained_consent(b, "alice")  # the engine would learn the grant
    capsys.readouterr()
    rc = main([*args, "erase", "--user", "alice", "--yes", "--broker", user_url(b, "alice")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "erased alice locally: 1 consent event(s)" in out
    assert f"cleared the retained {P}/consent/alice" in out and f"{P}/status/alice" in out
    assert consent_rows(home, "alice") == 0
    assert retained_consent(b, "alice") == []


def test_erase_when_the_broker_refuses_still_erases_locally_and_exits_75_naming_why(secure_broker, tmp_path, capsys):
    b, home = secure_broker, tmp_path / "home"
    args = ["--set", f"store.state_dir={home}"]
    assert main([*args, "consent", "grant", "--user", "bob", "--to", "sam", "--yes", "--broker", user_url(b, "bob")]) == 0
    capsys.readouterr()
    rc = main([*args, "erase", "--user", "bob", "--yes", "--broker", user_url(b, "bob", "not-bobs-password")])
    out, err = capsys.readouterr()
    assert rc == 75, err
    assert "erased bob locally: 1 consent event(s)" in out
    assert consent_rows(home, "bob") == 0  # whatever the broker said
    assert len(err.strip().splitlines()) == 1
    assert "not cleared" in err and "not authorised" in err and "bob's own account" in err
    assert retained_consent(b, "bob")  # honestly reported: still there


def test_erase_help_documents_the_exit_codes(capsys):
    assert main(["erase", "--help"]) == 0
    out = capsys.readouterr().out
    assert "75" in out and "broker part failed" in out
