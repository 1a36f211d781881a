"""What `stresswatch demo` tells a user: against a broker with accounts, why it cannot run
and what to do instead."""

from __future__ import annotations

from stresswatch.cli import main


def test_demo_against_a_broker_with_accounts_says_it_needs_an_anonymous_one(secure_broker, tmp_path, capsys):
    rc = main(["demo", "--broker", secure_broker.url, "--state-dir", str(tmp_path / "s"), "--speed", "0"])
    err = capsys.readouterr().err
    assert rc == 69
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Not authorized" in lines[0]
    assert "without an account" in lines[0] and "without --broker" in lines[0] and "allow_anonymous" in lines[0]


def test_demo_with_credentials_in_the_url_never_prints_the_password(secure_broker, tmp_path, capsys):
    url = f"mqtt://sam:{secure_broker.passwords['sam']}@127.0.0.1:{secure_broker.port}"
    rc = main(["demo", "--broker", url, "--state-dir", str(tmp_path / "s"), "--speed", "0"])
    err = capsys.readouterr().err
    assert rc == 69 and "without an account" in err
    assert secure_broker.passwords["sam"] not in err


def test_demo_says_what_happened_to_each_person(tmp_path, capsys):
    import re

    assert main(["demo", "--state-dir", str(tmp_path / "s"), "--speed", "0"]) == 0
    text = re.sub(r"[│┃║\s]+", " ", capsys.readouterr().out)
    assert "what happened to each person" in text
    bob = text[text.index(" bob yes ") :]
    assert "moving in" in bob and "exercise, so those windows are not scored" in bob
    dan = text[text.index(" dan yes ") :]
    assert "HR-only watch: no beat-to-beat intervals, so no HRV" in dan and "no alert: heart rate stayed" in dan
    carol = text[text.index(" carol no ") :]
    assert "not sent: withheld no consent" in carol
