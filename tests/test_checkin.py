"""Check-ins (`stresswatch checkin`): the strict decoder, the same dispatcher as a detector
alert with its own cooldown, the companion's durable queue; end to end through the
generated broker with real accounts and a real engine."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.alerts.checkin import CheckinQueue, checkin_alert_id, decision_for
from stresswatch.wire.checkin import NOTE_MAX, CheckinMessage, decode_checkin
from stresswatch.alerts.dispatch import Dispatcher
from stresswatch.alerts.lifecycle import AlertState, EscalationPolicy
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.transport import MemoryTransport
from stresswatch.consent import ConsentLedger
from stresswatch.consent.state import Visibility
from stresswatch.errors import ParseError
from stresswatch.model import AlertDecision, AlertLevel, Reason, alert_id_for

T0 = datetime(2026, 11, 25, 12, tzinfo=timezone.utc)


def payload(**over) -> bytes:
    d = {"schema_version": 1, "checkin_id": str(uuid.uuid4()), "user": "alice", "at": T0.isoformat(), "level": "high", "note": "call me?"}
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not None}).encode()


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_checkin_decoder_raises_only_parse_error(data):
    try:
        decode_checkin(data, topic_user="alice", now=T0)
    except ParseError:
        pass


@settings(max_examples=200)
@given(
    st.fixed_dictionaries(
        {
            "checkin_id": st.one_of(st.text(max_size=40), st.uuids().map(str)),
            "user": st.sampled_from(["alice", "bob", ""]),
            "at": st.one_of(st.text(max_size=30), st.datetimes(timezones=st.just(timezone.utc)).map(datetime.isoformat)),
            "level": st.sampled_from(["elevated", "high", "low", 3]),
            "note": st.one_of(st.none(), st.text(max_size=NOTE_MAX + 20)),
        }
    )
)
def test_checkin_decoder_on_near_valid_json_accepts_only_what_fits(d):
    try:
        msg = decode_checkin(json.dumps(d).encode(), topic_user="alice", now=T0)
    except ParseError:
        return
    assert msg.user == "alice" and abs((msg.at - T0).total_seconds()) <= 24 * 3600
    assert msg.level in (AlertLevel.ELEVATED, AlertLevel.HIGH) and (msg.note is None or len(msg.note) <= NOTE_MAX)
    uuid.UUID(msg.checkin_id)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"user": "bob"}, "user"),
        ({"checkin_id": "42"}, "checkin_id"),
        ({"at": (T0 - timedelta(hours=25)).isoformat()}, "at"),
        ({"at": (T0 + timedelta(minutes=10)).isoformat()}, "at"),
        ({"at": "2026-11-25T12:00:00"}, "at"),  # no time zone
        ({"level": "panic"}, "level"),
        ({"note": "x" * (NOTE_MAX + 1)}, "note"),
        ({"note": "bell\x07"}, "note"),
        ({"extra": 1}, "extra"),
    ],
)
def test_checkin_decoder_names_the_offending_field(over, field):
    with pytest.raises(ParseError) as err:
        decode_checkin(payload(**over), topic_user="alice", now=T0)
    assert err.value.field == field


def test_a_checkin_is_an_alert_with_reason_self_report_and_the_persons_level_and_words():
    cid = str(uuid.uuid4())
    d = decision_for("alice", payload(checkin_id=cid), now=T0)
    assert d.reasons == (Reason.SELF_REPORT,) and d.level is AlertLevel.HIGH and d.note == "call me?"
    assert d.alert_id == checkin_alert_id("alice", cid) != checkin_alert_id("bob", cid)


def _dispatcher(tmp_path, clock, **policy):
    ledger = ConsentLedger(tmp_path / "s.sqlite")
    outbox = Outbox(tmp_path / "s.sqlite")
    t = MemoryTransport()
    pol = EscalationPolicy(**{"escalate_after_s": 10_000, "renotify_after_s": 10_000, **policy})
    return ledger, outbox, t, Dispatcher(outbox, ledger, t, clock=clock, policy=pol, groups={"team": ["sam", "kim"]})


def test_checkin_goes_through_consent_and_groups_with_a_cooldown_of_its_own(tmp_path):
    now = [T0]
    ledger, outbox, t, disp = _dispatcher(tmp_path, lambda: now[0], cooldown_s=3600, checkin_cooldown_s=300)
    ledger.grant("alice", ["team"], now=T0 - timedelta(days=1), visibility=Visibility.LEVEL_AND_REASONS, display_name="A.")
    detector = AlertDecision(alert_id_for("alice", T0), "alice", T0, T0, AlertLevel.ELEVATED, (Reason.HRV_BELOW_BASELINE,), 3.0)
    disp.raise_alerts([detector])
    now[0] = T0 + timedelta(minutes=1)  # inside the detector's cooldown: a check-in still goes out
    first = disp.raise_alerts([decision_for("alice", payload(at=now[0].isoformat()), now=now[0])])[0]
    assert first.state is not AlertState.SUPPRESSED and set(first.targets) == {"sam", "kim"}
    sent = [json.loads(m.payload) for m in t.messages if json.loads(m.payload)["alert_id"] == first.alert_id]
    assert {m.topic for m in t.messages if first.alert_id in m.payload.decode()} == {"stresswatch/v1/alerts/sam", "stresswatch/v1/alerts/kim"}
    assert sent[0]["reasons"] == ["self_report"] and sent[0]["level"] == "high" and sent[0]["note"] == "call me?"
    assert sent[0]["user"] == "A." and "score" not in sent[0]
    now[0] = T0 + timedelta(minutes=2)  # a second check-in inside the check-in cooldown
    second = disp.raise_alerts([decision_for("alice", payload(at=now[0].isoformat()), now=now[0])])[0]
    assert second.state is AlertState.SUPPRESSED
    now[0] = T0 + timedelta(minutes=2, seconds=30)  # and the detector's cooldown ignores check-ins
    det2 = AlertDecision(alert_id_for("alice", now[0]), "alice", now[0], now[0], AlertLevel.ELEVATED, (Reason.HR_ABOVE_BASELINE,), 3.0)
    assert disp.raise_alerts([det2])[0].state is AlertState.SUPPRESSED  # the first detector alert's cooldown
    ledger.close()
    outbox.close()


def test_the_same_checkin_twice_is_one_alert_and_without_consent_it_is_withheld(tmp_path):
    ledger, outbox, t, disp = _dispatcher(tmp_path, lambda: T0)
    p = payload()
    disp.raise_alerts([decision_for("alice", p, now=T0)])
    disp.raise_alerts([decision_for("alice", p, now=T0)])
    recs = outbox.records("alice")
    assert len(recs) == 1 and recs[0].state is AlertState.WITHHELD and not t.messages  # no consent: no one
    ledger.close()
    outbox.close()


def test_companion_queue_keeps_a_checkin_until_sent_and_drops_stale_ones(tmp_path):
    path = tmp_path / "q.sqlite"
    with CheckinQueue(path) as q:
        msg = q.add("alice", now=T0, level=AlertLevel.ELEVATED, note=None)
        q.add("alice", now=T0 - timedelta(hours=30), level=AlertLevel.HIGH, note="old")
    with CheckinQueue(path) as q:  # survives the process
        assert len(q.pending("alice")) == 2
        assert [s.at for s in q.drop_stale(T0)] == [T0 - timedelta(hours=30)]
        (only,) = q.pending("alice")
        assert CheckinMessage.model_validate_json(only.payload) == msg
        q.sent(msg.checkin_id)
        assert q.pending() == []


def test_checkin_end_to_end_reaches_the_workers_watch_once_and_is_in_the_persons_export(secure_broker, tmp_path):
    from stresswatch.alerts.outbox import Outbox
    from stresswatch.alerts.transport import MqttTransport
    from stresswatch.alerts.worker import WorkerClient
    from stresswatch.alerts.topics import Topics
    from stresswatch.cli import main

    from conftest import wait_for
    from engine_harness import engine_settings, publish_consent, running_engine

    b = secure_broker
    state = tmp_path / "engine"
    got = []
    sam = WorkerClient(b.url, "sam", got.append, username="sam", password=b.passwords["sam"], seen_path=tmp_path / "seen.sqlite")
    try:
        with running_engine(engine_settings(b, state)):
            publish_consent(b, "alice", ["sam"], tmp_path, name="Robin")
            creds = ["--set", "mqtt.username=alice", "--set", f"mqtt.password={b.passwords['alice']}"]
            q = str(tmp_path / "q.sqlite")
            assert main([*creds, "checkin", "--user", "alice", "--note", "call me", "--broker", b.url, "--queue-file", q]) == 0
            assert wait_for(lambda: len(got) == 1, 20)
            assert got[0].reasons == [Reason.SELF_REPORT] and got[0].note == "call me" and got[0].user == "Robin"
            # the same check-in delivered twice (a PUBACK lost before the queue row was deleted): recorded once
            again = CheckinMessage(checkin_id=str(uuid.uuid4()), user="alice", at=datetime.now(timezone.utc), note="twice")
            t = MqttTransport(b.url, client_id="companion-alice-2", username="alice", password=b.passwords["alice"])
            t.publish(Topics().checkin("alice"), again.encode(), qos=1)
            t.publish(Topics().checkin("alice"), again.encode(), qos=1)
            t.close()
            assert wait_for(lambda: len(got) == 2, 20)
            with Outbox(state / "stresswatch.sqlite") as ob:
                assert wait_for(lambda: len(ob.records("alice")) == 2, 5)
        out = tmp_path / "alice-export.json"
        assert main(["--set", f"store.state_dir={state}", "export", "--user", "alice", "--out", str(out)]) == 0
        alerts = json.loads(out.read_text())["alerts"]
        assert sorted(a["checkin_note"] for a in alerts) == ["call me", "twice"]
        assert all(a["reasons"] == ["self_report"] and a["notified"] == ["sam"] for a in alerts)
    finally:
        sam.close()
    assert len(got) == 2


def test_a_checkin_shows_in_alerts_watch_with_the_persons_words(secure_broker, tmp_path, capsys):
    import threading

    from stresswatch.cli import main

    from engine_harness import engine_settings, publish_consent, running_engine

    b = secure_broker
    as_sam = ["--set", "mqtt.username=sam", "--set", f"mqtt.password={b.passwords['sam']}"]
    with running_engine(engine_settings(b, tmp_path / "engine")):
        publish_consent(b, "alice", ["sam"], tmp_path, name="Robin")
        rc: list[int] = []
        watch = threading.Thread(target=lambda: rc.append(main([*as_sam, "alerts", "watch", "--worker", "sam", "--broker", b.url,
                                 "--count", "1", "--timeout-s", "30", "--seen-file", str(tmp_path / "seen.sqlite")])))  # fmt: skip
        watch.start()
        time.sleep(2.0)  # subscribed
        creds = ["--set", "mqtt.username=alice", "--set", f"mqtt.password={b.passwords['alice']}"]
        assert main([*creds, "checkin", "--user", "alice", "--note", "after 6", "--broker", b.url, "--queue-file", str(tmp_path / "q.sqlite")]) == 0
        watch.join(40)
    assert rc == [0]
    out = capsys.readouterr().out
    assert "reach out to Robin" in out and "reasons=self_report" in out and 'note="after 6"' in out
