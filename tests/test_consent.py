"""Consent ledger (real SQLite file) and the pure gate."""

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from stresswatch.consent import ConsentLedger, Status, Verdict, Visibility, decide
from stresswatch.consent.gate import alert_wire
from stresswatch.errors import ConsentError
from stresswatch.model import AlertDecision, AlertLevel, Reason, alert_id_for

T = datetime(2026, 3, 3, 12, tzinfo=timezone.utc)


def decision(user: str = "alice") -> AlertDecision:
    start = T - timedelta(minutes=15)
    return AlertDecision(alert_id_for(user, start), user, T, start, AlertLevel.HIGH, (Reason.HRV_BELOW_BASELINE,), 4.2)


def test_grant_then_revoke_is_recorded_and_derived(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        st = ledger.grant("alice", ["sam"], now=T)
        assert st.status is Status.ACTIVE and st.recipients == ("sam",)
        assert st.display_name and st.display_name.startswith("peer-") and "alice" not in st.display_name
        assert ledger.revoke("alice", now=T + timedelta(minutes=1)).status is Status.REVOKED
    # a new connection sees the same history: the file is the source of truth
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        events = ledger.events("alice")
        assert [e.action.value for e in events] == ["grant", "revoke"]
        assert all(e.text_version for e in events)
        assert ledger.state("alice").status is Status.REVOKED


def test_ledger_is_append_only(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        ledger.grant("alice", ["sam"], now=T)
    db = sqlite3.connect(tmp_path / "c.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE consent_events SET action = 'grant'")


def test_pause_resume_keeps_choices_and_pseudonym(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        first = ledger.grant("alice", ["sam", "team"], now=T, visibility=Visibility.LEVEL_AND_REASONS)
        assert ledger.pause("alice", now=T).status is Status.PAUSED
        back = ledger.resume("alice", now=T)
        assert back.status is Status.ACTIVE
        assert (back.recipients, back.visibility, back.display_name) == (first.recipients, first.visibility, first.display_name)
        regrant = ledger.grant("alice", ["sam"], now=T)
        assert regrant.display_name == first.display_name


def test_grant_needs_a_recipient(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger, pytest.raises(ConsentError):
        ledger.grant("alice", [], now=T)


def test_gate_withholds_without_active_consent(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        assert decide(ledger.state("alice"), decision(), T).verdict is Verdict.WITHHELD_NO_CONSENT
        assert decide(None, decision(), T).verdict is Verdict.WITHHELD_NO_CONSENT
        ledger.grant("alice", ["sam"], now=T)
        ledger.pause("alice", now=T)
        assert decide(ledger.state("alice"), decision(), T).verdict is Verdict.WITHHELD_PAUSED
        ledger.revoke("alice", now=T)
        assert decide(ledger.state("alice"), decision(), T).verdict is Verdict.WITHHELD_REVOKED


def test_gate_shows_only_what_consent_allows(tmp_path):
    with ConsentLedger(tmp_path / "c.sqlite") as ledger:
        plain = decide(ledger.grant("alice", ["sam"], now=T), decision(), T)
        assert plain.allowed and plain.recipients == ("sam",)
        body = plain.payload.model_dump()
        assert body["level"] is None and body["reasons"] == []
        assert body["user"] != "alice"
        detailed = decide(ledger.grant("alice", ["sam"], now=T, visibility=Visibility.LEVEL_AND_REASONS), decision(), T)
        assert detailed.payload.level is AlertLevel.HIGH
        assert detailed.payload.reasons == [Reason.HRV_BELOW_BASELINE]
        # never raw physiology on the wire unless explicitly granted
        assert "score" not in alert_wire(detailed.payload).decode()
        assert "level" not in alert_wire(plain.payload).decode()
