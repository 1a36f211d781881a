"""Parsers at the engine's MQTT edges: consent messages and worker acks. Arbitrary bytes raise
only ParseError; valid messages round-trip."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.wire.acks import AckAction, AckMessage
from stresswatch.alerts.lifecycle import Outcome
from stresswatch.consent import ConsentLedger
from stresswatch.consent.state import QuietHours, Visibility
from stresswatch.wire.consent import decode_consent, encode_consent
from stresswatch.errors import ParseError

T = datetime(2026, 11, 25, 9, tzinfo=timezone.utc)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_consent_decoder_raises_only_parse_error(data):
    try:
        decode_consent(data, topic_user="alice")
    except ParseError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_ack_decoder_raises_only_parse_error(data):
    try:
        AckMessage.decode(data)
    except ParseError:
        pass


@settings(max_examples=200)
@given(
    st.fixed_dictionaries(
        {"alert_id": st.text(max_size=70), "action": st.sampled_from(["ack", "resolve", "x"]), "outcome": st.sampled_from([None, "reached_out", "bad"]), "note": st.one_of(st.none(), st.text(max_size=600))}
    )
)
def test_ack_decoder_on_near_valid_json(d):
    import json

    try:
        AckMessage.decode(json.dumps(d).encode())
    except ParseError:
        pass


def test_consent_round_trip_and_idempotent_append(tmp_path):
    with ConsentLedger(tmp_path / "companion.sqlite") as c:
        c.grant("alice", ["sam", "team-north"], now=T, visibility=Visibility.LEVEL_AND_REASONS,
                quiet_hours=QuietHours.parse("22:00-07:00", "Europe/London"), expires_at=T + timedelta(days=30))  # fmt: skip
        c.pause("alice", now=T + timedelta(hours=1))
        payload = encode_consent("alice", c.events("alice"))
        expected = c.state("alice")
    events = decode_consent(payload, topic_user="alice")
    with ConsentLedger(tmp_path / "engine.sqlite") as e:
        assert e.extend(events) == 2
        assert e.extend(decode_consent(payload, topic_user="alice")) == 0  # the retained copy again
        got = e.state("alice")
    for f in ("status", "recipients", "visibility", "display_name", "quiet_hours", "expires_at", "text_version", "withdrawn_at"):
        assert getattr(got, f) == getattr(expected, f), f
    assert [ev.event_id for ev in got.history] == [ev.event_id for ev in expected.history]


def test_consent_payload_for_another_user_is_refused():
    with pytest.raises(ParseError, match="user"):
        decode_consent(encode_consent("mallory", []), topic_user="alice")


def test_resolve_needs_an_outcome_and_ack_takes_none():
    with pytest.raises(ParseError):
        AckMessage.decode(b'{"alert_id": "a", "action": "resolve"}')
    with pytest.raises(ParseError):
        AckMessage.decode(b'{"alert_id": "a", "action": "ack", "outcome": "no_answer"}')
    m = AckMessage.decode(AckMessage(alert_id="6f1c2d8e-4b7a-5c3e-9a1d-2e5f7b9c0a11", action=AckAction.RESOLVE, outcome=Outcome.NOT_NEEDED, note="ok").encode())
    assert (m.outcome, m.note) == (Outcome.NOT_NEEDED, "ok")
