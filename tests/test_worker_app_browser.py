"""The worker app in a real Chromium (Debian's, driven by Playwright; no browser download),
against a real Mosquitto with the generated config and accounts, a real engine and the app
served by uvicorn. Screenshots of the page go to docs/ (desktop and phone width)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stresswatch.alerts.lifecycle import AlertState
from stresswatch.alerts.outbox import Outbox
from stresswatch.cli import main

from engine_harness import engine_settings, publish_consent, running_engine, stream_as
from webapp_harness import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parent.parent / "docs"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"]
T = 15_000  # ms: the longest any step may take (the engine answers in well under a second)


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: the browser tests need it (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def signed_in(browser, base: str, worker: str, password: str, **context):  # type: ignore[no-untyped-def]
    page = browser.new_context(**context).new_page()
    page.goto(base)
    page.get_by_label("Worker id").fill(worker)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {worker}").wait_for(timeout=T)
    page.locator("#connection.live").wait_for(timeout=T)
    return page


def cards(page, name: str):  # type: ignore[no-untyped-def]
    return page.locator("li.alert", has_text=f"Reach out to {name}")


def test_worker_signs_in_sees_a_live_alert_acks_resolves_and_keeps_history_across_reload_and_broker_restart(
    secure_broker, tmp_path, browser, rr_stream
):
    b = secure_broker
    state = tmp_path / "engine"
    with running_engine(engine_settings(b, state)), serving(b.url, tmp_path / "web") as base:
        publish_consent(b, "alice", ["sam"], tmp_path, name="Robin")
        # a wrong password: one clear message, still signed out
        page = browser.new_context().new_page()
        page.goto(base)
        page.get_by_label("Worker id").fill("sam")
        page.get_by_label("Password").fill("wrong")
        page.keyboard.press("Enter")  # keyboard only
        page.get_by_text("Wrong worker id or password").wait_for(timeout=T)
        page.context.close()

        sam = signed_in(browser, base, "sam", b.passwords["sam"])
        kim = signed_in(browser, base, "kim", b.passwords["kim"])
        sam.get_by_text("No alerts here.").wait_for(timeout=T)

        # an alert the detector raises from synthetic heart data (conftest.synthetic_rr) appears without a reload
        start_s = int(time.time()) // 60 * 60 - 3 * 3600
        stream_as(b, "alice", rr_stream("alice", start_s, 1, seed=1))
        card = cards(sam, "Robin")
        card.wait_for(timeout=30_000)
        card.locator(".badge", has_text="Open").wait_for(timeout=T)
        assert "Escalates" in card.inner_text() and "Raised" in card.inner_text()
        with Outbox(state / "stresswatch.sqlite") as ob:
            (rec,) = ob.records("alice")
        alert_id = rec.alert_id

        # acknowledge, then resolve: the page shows what the engine recorded
        card.get_by_role("button", name="I'm reaching out to Robin").click()
        card.get_by_text("The engine recorded: acknowledged by sam").wait_for(timeout=T)
        card.locator(".badge", has_text="Acknowledged").wait_for(timeout=T)
        card.get_by_label("Outcome").select_option("no_answer")
        card.get_by_label("Note for the record").fill("left a message")
        card.get_by_role("button", name="Resolve the alert for Robin").click()
        card.get_by_text("The engine recorded: resolved by sam (no answer)").wait_for(timeout=T)
        with Outbox(state / "stresswatch.sqlite") as ob:
            assert ob.get(alert_id).state is AlertState.RESOLVED and ob.get(alert_id).note == "left a message"

        # the other worker never saw it, and cannot act on it
        kim.get_by_role("button", name="Refresh").click()
        kim.get_by_text("No alerts here.").wait_for(timeout=T)
        assert cards(kim, "Robin").count() == 0
        r = kim.request.post(f"{base}/api/alerts/{alert_id}/ack", headers={"X-CSRF-Token": kim.evaluate("csrf")})
        assert r.json()["ok"] is False and "no alert" in r.json()["error"]

        # a reload shows the history, filterable by state
        sam.reload()
        sam.get_by_text("Signed in as sam").wait_for(timeout=T)
        cards(sam, "Robin").locator(".badge", has_text="Resolved").wait_for(timeout=T)
        sam.get_by_label("Show").select_option("open")
        sam.get_by_text("No alerts here.").wait_for(timeout=T)
        sam.get_by_label("Show").select_option("all")
        cards(sam, "Robin").wait_for(timeout=T)

        # the broker restarts: "reconnecting", then live again; a new alert arrives once
        b.process.stop()
        sam.locator("#connection.reconnecting").wait_for(timeout=T)
        assert "Reconnecting" in sam.locator("#connection").inner_text()
        b.process.start()
        sam.locator("#connection.live").wait_for(timeout=30_000)
        publish_consent(b, "bob", ["sam"], tmp_path, name="Sky")
        checkin = [sys.executable, "-m", "stresswatch.cli", "--set", "mqtt.username=bob", "--set", f"mqtt.password={b.passwords['bob']}",
                   "checkin", "--user", "bob", "--note", "a rough day", "--broker", b.url, "--queue-file", str(tmp_path / "bob-q.sqlite")]  # fmt: skip
        subprocess.run(checkin, check=True, capture_output=True, timeout=60)
        sky = cards(sam, "Sky")
        sky.get_by_text("In their words: “a rough day”").wait_for(timeout=T)
        sky.get_by_text("they asked for contact themselves").wait_for(timeout=T)
        time.sleep(1.0)  # any duplicate delivery would have arrived by now
        assert cards(sam, "Sky").count() == 1 and cards(sam, "Robin").count() == 1
        assert sam.locator("li.alert").count() == 2

        # what the page shows never carries a physiological number
        text = sam.locator("main").inner_text()
        assert "score" not in text.lower() and "bpm" not in text.lower() and " ms" not in text

        # screenshots for docs/WORKER-APP.md, taken by this browser (written into docs/ with
        # STRESSWATCH_UPDATE_SCREENSHOTS=1, so an ordinary test run leaves the tree clean)
        shots = DOCS if os.environ.get("STRESSWATCH_UPDATE_SCREENSHOTS") == "1" else tmp_path
        sam.get_by_role("button", name="Refresh").click()
        sam.get_by_text("2 alerts.").wait_for(timeout=T)
        sam.set_viewport_size({"width": 1200, "height": 800})
        sam.screenshot(path=str(shots / "worker-app-desktop.png"), full_page=True)
        phone = signed_in(browser, base, "sam", b.passwords["sam"], viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True)
        cards(phone, "Sky").wait_for(timeout=T)
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        phone.screenshot(path=str(shots / "worker-app-phone.png"), full_page=True)
        assert all((shots / f"worker-app-{k}.png").stat().st_size > 10_000 for k in ("desktop", "phone"))


def test_the_engine_going_offline_shows_and_a_removed_account_is_signed_out(secure_broker, tmp_path, browser):
    b = secure_broker
    with running_engine(engine_settings(b, tmp_path / "engine")) as eng, serving(b.url, tmp_path / "web") as base:
        sam = signed_in(browser, base, "sam", b.passwords["sam"])
        sam.get_by_text("Engine online").wait_for(timeout=T)
        eng.request_stop()  # its "offline" (also its last will) reaches the page
        sam.get_by_text("Engine offline: new alerts and your actions wait until it is back").wait_for(timeout=T)
        assert main(["broker", "remove", "sam", "--dir", str(b.dir)]) == 0
        b.reload()  # mosquitto rereads its accounts and drops sam's connection; sam's reconnect is refused
        sam.locator("#connection.signed_out").wait_for(timeout=T)
        assert "account removed" in sam.locator("#connection").inner_text()
        sam.get_by_text("the broker no longer accepts your account").wait_for(timeout=T)
        assert sam.get_by_label("Worker id").is_visible()
        sam.reload()  # the session is gone, not just hidden
        sam.get_by_label("Worker id").wait_for(timeout=T)
        assert sam.request.get(f"{base}/api/alerts").status == 401


def test_checkin_from_the_companion_reaches_the_app_after_waiting_offline(secure_broker, tmp_path, browser):
    b = secure_broker
    with running_engine(engine_settings(b, tmp_path / "engine")), serving(b.url, tmp_path / "web", keepalive_s=1.0) as base:
        publish_consent(b, "alice", ["sam"], tmp_path, name="Robin")
        sam = signed_in(browser, base, "sam", b.passwords["sam"], permissions=["notifications"])
        # count the notifications the page raises (the browser's own would need a desktop)
        sam.evaluate("""() => { window.__shown = []; const N = window.Notification;
            window.Notification = class extends N { constructor(t, o) { super(t, o); window.__shown.push(t); } };
            window.Notification.requestPermission = () => N.requestPermission(); }""")
        sam.get_by_role("button", name="Allow notifications and sound").click()
        sam.get_by_text("Notifications and sound on").wait_for(timeout=T)
        # every control has a label (an accessible name) a screen reader announces
        unlabelled = sam.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(e => !e.closest('template') && e.offsetParent !== null)
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).length""")
        assert unlabelled == 0
        creds = ["--set", "mqtt.username=alice", "--set", f"mqtt.password={b.passwords['alice']}"]
        q = ["--queue-file", str(tmp_path / "alice-q.sqlite")]
        # offline: the check-in is kept on disk, nothing is lost
        assert main([*creds, "checkin", "--user", "alice", "--note", "call me", "--level", "high", "--broker", "mqtt://127.0.0.1:1", "--wait-s", "1", *q]) != 0
        assert main([*creds, "checkin", "--user", "alice", "--send-queued", "--broker", b.url, *q]) == 0
        card = cards(sam, "Robin")
        card.get_by_text("In their words: “call me”").wait_for(timeout=T)
        assert "high" in card.inner_text()
        assert main([*creds, "checkin", "--user", "alice", "--send-queued", "--broker", b.url, *q]) == 0  # nothing left: sent once
        time.sleep(1.0)
        assert cards(sam, "Robin").count() == 1
        assert sam.evaluate("window.__shown") == ["Reach out to Robin"]  # one notification, for the one alert
        # keyboard only: the action is a real button, Enter works
        card.get_by_role("button", name="I'm reaching out to Robin").focus()
        sam.keyboard.press("Enter")
        card.get_by_text("The engine recorded: acknowledged by sam").wait_for(timeout=T)

        # the laptop sleeps: its connection dies without an error reaching the page, and new
        # streams hang until the network is back; a check-in arrives meanwhile. The page finds
        # its stream silent (no ping for 2.5 s here), says so, reconnects, asks the engine again
        # once through: shown, once.
        sam.route("**/api/events", lambda route: None)  # requests hang, as on a dead network
        sam.evaluate("source.close()")  # the socket the sleep killed
        sam.locator("#connection.reconnecting").wait_for(timeout=T)
        publish_consent(b, "bob", ["sam"], tmp_path, name="Sky")
        assert main(["--set", "mqtt.username=bob", "--set", f"mqtt.password={b.passwords['bob']}", "checkin", "--user", "bob",
                     "--broker", b.url, "--queue-file", str(tmp_path / "bob-q.sqlite")]) == 0  # fmt: skip
        time.sleep(1.0)
        assert cards(sam, "Sky").count() == 0  # not yet: nothing reaches a sleeping laptop
        sam.unroute("**/api/events")  # awake
        cards(sam, "Sky").wait_for(timeout=T)
        sam.locator("#connection.live").wait_for(timeout=T)
        time.sleep(1.0)
        assert cards(sam, "Sky").count() == 1 and cards(sam, "Robin").count() == 1
