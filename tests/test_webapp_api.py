"""The worker app's HTTP API against a real Mosquitto (generated config, real accounts) and a
real engine: sign-in as the broker account, cookie and CSRF rules, per-worker isolation."""

from __future__ import annotations

import httpx
import pytest

from stresswatch.alerts.lifecycle import OPEN_STATES, AlertState
from stresswatch.alerts.outbox import Outbox
from stresswatch.cli import main

from conftest import wait_for
from engine_harness import engine_settings, publish_consent, running_engine
from webapp_harness import serving


def sign_in(base: str, worker: str, password: str) -> tuple[httpx.Client, httpx.Response]:
    c = httpx.Client(base_url=base, timeout=15)
    return c, c.post("/api/session", json={"worker": worker, "password": password})


@pytest.fixture
def world(secure_broker, tmp_path):
    b = secure_broker
    state = tmp_path / "engine"
    with running_engine(engine_settings(b, state)):
        publish_consent(b, "alice", ["sam"], tmp_path, name="Robin")
        assert main(["--set", "mqtt.username=alice", "--set", f"mqtt.password={b.passwords['alice']}", "checkin", "--user", "alice",
                     "--note", "after 6 please", "--broker", b.url, "--queue-file", str(tmp_path / "q.sqlite")]) == 0  # fmt: skip
        with Outbox(state / "stresswatch.sqlite") as ob:
            assert wait_for(lambda: any(r.targets for r in ob.records()), 20)
            alert_id = ob.records()[0].alert_id
        with serving(b.url, tmp_path / "web") as base:
            yield b, state, base, alert_id


def test_sign_in_is_the_broker_account_and_a_wrong_password_says_so(world):
    b, _, base, alert_id = world
    c, r = sign_in(base, "sam", b.passwords["sam"])
    assert r.status_code == 200 and r.json()["worker"] == "sam"
    _, wrong = sign_in(base, "sam", "not-the-password")
    assert wrong.status_code == 401 and "Wrong worker id or password" in wrong.json()["error"]
    _, wrong = sign_in(base, "nobody", "x")
    assert wrong.status_code == 401
    # the failed attempts did not end sam's own session
    assert [a["alert_id"] for a in c.get("/api/alerts").json()["alerts"]] == [alert_id]
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # plain HTTP on loopback
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_actions_need_the_csrf_token_and_show_what_the_engine_recorded(world):
    b, state, base, alert_id = world
    c, r = sign_in(base, "sam", b.passwords["sam"])
    csrf = r.json()["csrf"]
    assert c.post(f"/api/alerts/{alert_id}/ack").status_code == 403  # no token
    assert c.post(f"/api/alerts/{alert_id}/ack", headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"}).status_code == 403
    with Outbox(state / "stresswatch.sqlite") as ob:
        assert ob.get(alert_id).state in OPEN_STATES and ob.get(alert_id).acked_by is None  # nothing happened
    r = c.post(f"/api/alerts/{alert_id}/ack", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["ok"] and r.json()["alert"]["state"] == "acknowledged"
    r = c.post(f"/api/alerts/{alert_id}/resolve", json={"outcome": "reached_out", "note": "talked"}, headers={"X-CSRF-Token": csrf})
    body = r.json()
    assert body["alert"]["state"] == "resolved" and body["alert"]["outcome"] == "reached_out" and body["alert"]["resolved_by"] == "sam"
    listed = c.get("/api/alerts", params={"state": "resolved"}).json()["alerts"]
    assert [a["alert_id"] for a in listed] == [alert_id]
    assert listed[0]["user"] == "Robin" and listed[0]["note"] == "after 6 please" and listed[0]["reasons"] == ["self_report"]
    assert "score" not in listed[0]  # never a physiological number
    assert c.get("/api/alerts", params={"state": "open"}).json()["alerts"] == []


def test_a_worker_sees_and_acts_on_only_their_own_alerts(world):
    b, state, base, alert_id = world
    kim, r = sign_in(base, "kim", b.passwords["kim"])
    assert kim.get("/api/alerts").json()["alerts"] == []
    r = kim.post(f"/api/alerts/{alert_id}/ack", headers={"X-CSRF-Token": r.json()["csrf"]})
    assert r.json()["ok"] is False and "no alert" in r.json()["error"] and "alert" not in r.json()
    with Outbox(state / "stresswatch.sqlite") as ob:
        assert ob.get(alert_id).state in OPEN_STATES and ob.get(alert_id).acked_by is None
    # kim's session cookie on sam's behalf does nothing either: the session is kim's
    assert httpx.get(f"{base}/api/alerts", timeout=10).status_code == 401


def test_signing_out_ends_the_session(world):
    b, _, base, _ = world
    c, r = sign_in(base, "sam", b.passwords["sam"])
    assert c.delete("/api/session", headers={"X-CSRF-Token": r.json()["csrf"]}).status_code == 200
    assert c.get("/api/alerts").status_code == 401


def test_over_tls_the_session_cookie_is_secure(secure_broker, tmp_path):
    import ssl
    import subprocess

    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    b = secure_broker
    with serving(b.url, tmp_path / "web", tls=(cert, key)) as base:
        assert base.startswith("https://")
        c = httpx.Client(base_url=base, timeout=15, verify=ssl.create_default_context(cafile=str(cert)))
        r = c.post("/api/session", json={"worker": "sam", "password": b.passwords["sam"]})
        assert r.status_code == 200
        assert "secure" in r.headers["set-cookie"].lower() and "max-age" in r.headers["strict-transport-security"]
        assert c.get("/api/session").json()["worker"] == "sam"  # the browser sends a Secure cookie back over HTTPS
        # a cross-site page cannot act with it: the Origin must be this app's https origin
        r2 = c.delete("/api/session", headers={"X-CSRF-Token": r.json()["csrf"], "Origin": base.replace("https", "http")})
        assert r2.status_code == 403


def test_without_the_web_extra_the_command_names_it(tmp_path):
    import subprocess
    import sys

    code = "import sys; sys.modules['uvicorn'] = None; from stresswatch.cli import main; sys.exit(main(['worker-app', '--broker', 'mqtt://127.0.0.1:1']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "pip install 'stresswatch[web]'" in r.stderr and "Traceback" not in r.stderr
