"""Alert lifecycle: the pure state machine, routing, and escalation / reminders / quiet hours /
cooldown driven by an injected clock over the real SQLite outbox."""

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from stresswatch.alerts.dispatch import Dispatcher
from stresswatch.alerts.lifecycle import (
    Acknowledged,
    AlertRecord,
    AlertState,
    Delivered,
    EscalationPolicy,
    LifecycleError,
    Outcome,
    Resolved,
    Sent,
    Withheld,
    apply,
    route,
)
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.transport import MemoryTransport
from stresswatch.consent import ConsentLedger
from stresswatch.consent.state import QuietHours

from test_outbox import Clock, decision

T = datetime(2026, 11, 25, 12, tzinfo=timezone.utc)


def test_happy_path_and_who_may_act():
    r = AlertRecord("a1", "alice")
    r = apply(r, Sent(("sam",), T))
    assert r.state is AlertState.RAISED and r.targets == ("sam",)
    r = apply(r, Delivered("sam", T))
    assert r.state is AlertState.DELIVERED
    with pytest.raises(LifecycleError):
        apply(r, Acknowledged("mallory", T))  # not sent to her
    r = apply(r, Acknowledged("sam", T))
    assert (r.state, r.acked_by) == (AlertState.ACKNOWLEDGED, "sam")
    with pytest.raises(LifecycleError):
        apply(r, Acknowledged("sam", T))
    r = apply(r, Resolved("sam", Outcome.NO_ANSWER, T, "left a message"))
    assert (r.state, r.outcome, r.note) == (AlertState.RESOLVED, Outcome.NO_ANSWER, "left a message")
    for ev in (Resolved("sam", Outcome.REACHED_OUT, T), Sent(("kim",), T), Withheld("withheld_revoked", T)):
        with pytest.raises(LifecycleError):
            apply(r, ev)


def test_resolve_without_ack_counts_as_acknowledged():
    r = apply(apply(AlertRecord("a1", "alice"), Sent(("sam",), T)), Delivered("sam", T))
    r = apply(r, Resolved("sam", Outcome.REACHED_OUT, T))
    assert (r.state, r.acked_by, r.acked_at) == (AlertState.RESOLVED, "sam", T)


def test_route_expands_groups_in_the_users_order_without_repeats():
    groups = {"team-north": ["sam", "kim", "lee"], "empty-ish": ["sam"]}
    assert route(["sam", "team-north", "empty-ish", "zoe"], groups) == [("sam",), ("kim", "lee"), ("zoe",)]


def make(tmp_path, clock, **policy):
    ledger = ConsentLedger(tmp_path / "s.sqlite")
    outbox = Outbox(tmp_path / "s.sqlite")
    t = MemoryTransport()
    pol = EscalationPolicy(**{"escalate_after_s": 600, "renotify_after_s": 900, "max_reminders": 1, "cooldown_s": 0, **policy})
    d = Dispatcher(outbox, ledger, t, clock=clock, groups={"team-north": ["kim", "lee"]}, policy=pol)
    return ledger, outbox, t, d


def sent(t: MemoryTransport) -> list[tuple[str, int]]:
    return [(m.topic.rsplit("/", 1)[1], json.loads(m.payload)["notice"]) for m in t.messages]


def test_escalation_to_the_group_then_one_reminder(tmp_path):
    clock = Clock(T)
    ledger, outbox, t, d = make(tmp_path, clock)
    ledger.grant("alice", ["sam", "team-north"], now=clock())
    a = d.raise_alert(decision(0)).alert_id
    assert sent(t) == [("sam", 0)]
    clock.tick(599)
    assert d.run_due() == 0 and len(t.messages) == 1
    clock.tick(1)
    assert d.run_due() == 1
    assert sent(t)[1:] == [("kim", 1), ("lee", 1)]
    assert outbox.get(a).state is AlertState.ESCALATED
    clock.tick(900)
    d.run_due()
    assert sorted(sent(t)[3:]) == [("kim", 2), ("lee", 2), ("sam", 2)]
    clock.tick(10_000)
    assert d.run_due() == 0 and len(t.messages) == 6  # max_reminders reached: no more
    assert [e["kind"] for e in outbox.events("alice")] == ["raised", "sent", "delivered", "escalated", "reminded"]
    # every notice of the alert carries the same id
    assert {json.loads(m.payload)["alert_id"] for m in t.messages} == {a}


def test_acknowledged_alert_does_not_escalate(tmp_path):
    clock = Clock(T)
    ledger, outbox, t, d = make(tmp_path, clock)
    ledger.grant("alice", ["sam", "team-north"], now=clock())
    a = d.raise_alert(decision(0)).alert_id
    clock.tick(60)
    d.on_ack("sam", json.dumps({"alert_id": a, "action": "ack"}).encode())
    clock.tick(3600)
    assert d.run_due() == 0 and sent(t) == [("sam", 0)]
    rec = outbox.get(a)
    assert (rec.state, rec.acked_by, rec.acked_at) == (AlertState.ACKNOWLEDGED, "sam", T + timedelta(seconds=60))


def test_quiet_hours_defer_until_they_end_in_the_users_time_zone(tmp_path):
    # 23:30 in London on 25 Nov (UTC+0) is inside 22:00-07:00; 07:00 local is 07:00 UTC
    clock = Clock(datetime(2026, 11, 25, 23, 30, tzinfo=timezone.utc))
    ledger, outbox, t, d = make(tmp_path, clock)
    ledger.grant("alice", ["sam"], now=clock(), quiet_hours=QuietHours.parse("22:00-07:00", "Europe/London"))
    a = d.raise_alert(decision(0)).alert_id
    assert t.messages == []
    rec = outbox.get(a)
    assert rec.state is AlertState.RAISED and rec.due_at == datetime(2026, 11, 26, 7, tzinfo=timezone.utc)
    clock.t = datetime(2026, 11, 26, 6, 59, tzinfo=timezone.utc)
    d.run_due()
    d.pump()
    assert t.messages == []
    clock.t = datetime(2026, 11, 26, 7, 0, tzinfo=timezone.utc)
    d.run_due()
    assert sent(t) == [("sam", 0)]


def test_quiet_hours_follow_the_time_zone_not_utc():
    q = QuietHours.parse("22:00-07:00", "America/New_York")
    # 03:00 UTC is 22:00 in New York (UTC-5 in November): quiet until 07:00 New York = 12:00 UTC
    assert q.ends_after(datetime(2026, 11, 26, 3, tzinfo=timezone.utc)) == datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    assert q.ends_after(datetime(2026, 11, 26, 2, tzinfo=timezone.utc)) is None


def test_expired_consent_withholds(tmp_path):
    clock = Clock(T)
    ledger, outbox, t, d = make(tmp_path, clock)
    ledger.grant("alice", ["sam"], now=clock(), expires_at=T + timedelta(days=1))
    d.raise_alert(decision(0))
    clock.tick(86400)
    b = d.raise_alert(decision(1)).alert_id
    assert sent(t) == [("sam", 0)]
    assert (outbox.get(b).state, outbox.get(b).verdict) == (AlertState.WITHHELD, "withheld_expired")


def test_cooldown_suppresses_a_second_alert_about_the_same_user(tmp_path):
    clock = Clock(T)
    ledger, outbox, t, d = make(tmp_path, clock, cooldown_s=1800)
    ledger.grant("alice", ["sam"], now=clock())
    d.raise_alert(decision(0))
    clock.tick(600)
    b = d.raise_alert(decision(1)).alert_id
    clock.tick(1800)
    c = d.raise_alert(decision(2)).alert_id
    d.pump()  # PUBACKs are recorded in batches, at the latest on the next pump
    assert outbox.get(b).state is AlertState.SUPPRESSED
    assert outbox.get(c).state is AlertState.DELIVERED
    assert len(t.messages) == 2


def test_revocation_stops_a_pending_escalation(tmp_path):
    clock = Clock(T)
    ledger, outbox, t, d = make(tmp_path, clock)
    ledger.grant("alice", ["sam", "team-north"], now=clock())
    a = d.raise_alert(decision(0)).alert_id
    clock.tick(300)
    ledger.revoke("alice", now=clock())
    clock.tick(600)
    d.run_due()
    assert sent(t) == [("sam", 0)]
    assert replace(outbox.get(a), due_at=None).state is AlertState.WITHHELD
