"""How a worker or user gives their broker account, and what they are told when it is
refused: at connect (a wrong or missing password) and later (the account was removed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from stresswatch.cli import main

HINT_PARTS = ("mqtt://USER:PASSWORD@HOST", "STRESSWATCH_MQTT__PASSWORD", "mqtt.password_file")


def _url(b, account: str, password: str) -> str:
    return f"mqtt://{account}:{password}@127.0.0.1:{b.port}"


def test_a_wrong_or_missing_password_says_not_authorized_and_how_to_pass_one(secure_broker, tmp_path, capsys):
    b = secure_broker
    state = ["--set", f"store.state_dir={tmp_path}"]
    for args in (
        ["alerts", "watch", "--worker", "sam", "--broker", _url(b, "sam", "wrong"), "--timeout-s", "1"],
        ["alerts", "watch", "--worker", "sam", "--broker", b.url, "--timeout-s", "1"],  # no account at all
        ["consent", "grant", "--user", "alice", "--to", "sam", "--yes", "--broker", _url(b, "alice", "wrong")],
    ):
        rc = main([*state, *args])
        err = capsys.readouterr().err
        assert rc != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Not authorized" in lines[0], err
        assert all(p in lines[0] for p in HINT_PARTS), err
        assert "wrong" not in lines[0]  # the password given is never echoed


def test_credentials_from_the_environment_work(secure_broker, tmp_path, monkeypatch, capsys):
    b = secure_broker
    monkeypatch.setenv("STRESSWATCH_MQTT__USERNAME", "alice")
    monkeypatch.setenv("STRESSWATCH_MQTT__PASSWORD", b.passwords["alice"])
    rc = main(["--set", f"store.state_dir={tmp_path}", "consent", "grant", "--user", "alice", "--to", "sam", "--yes", "--broker", b.url])
    assert rc == 0, capsys.readouterr().err


def test_help_says_how_to_pass_an_account(capsys):
    for args in (["--help"], ["alerts", "watch", "--help"]):
        assert main(args) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "mqtt://" in out and "PASSWORD@" in out and "STRESSWATCH_MQTT__PASSWORD" in out and "mqtt.password_file" in out


def test_a_watching_worker_whose_account_is_removed_says_not_authorised_and_exits(secure_broker, tmp_path):
    b = secure_broker
    b.add("worker", "lee")
    b.reload()
    env = {**os.environ, "STRESSWATCH_STORE__STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stresswatch.cli", "alerts", "watch", "--worker", "lee", "--broker", _url(b, "lee", b.passwords["lee"])],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "watching alerts" not in line:
            line = proc.stderr.readline()
        assert "watching alerts" in line
        assert main(["broker", "remove", "lee", "--dir", str(b.dir)]) == 0
        b.reload()
        rc = proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 77, err
    assert "not authorised" in err and "account was removed" in err
    assert err.count("connection lost") == 1  # no endless loop
    assert b.passwords["lee"] not in err
