"""The wire boundary (stresswatch.wire): every decoder takes arbitrary bytes and raises only
ParseError; what it accepts round-trips and is representable (a polars frame, a ledger row)."""

from __future__ import annotations

import json
import logging
import math
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stresswatch.consent import ConsentLedger
from stresswatch.errors import ParseError, WireError
from stresswatch.wire.acks import AckMessage
from stresswatch.wire.consent import decode_consent, encode_consent
from stresswatch.wire.ids import is_valid_id, validate_id
from stresswatch.wire.ingest import IngestBatch, decode_ingest
from stresswatch.wire.limits import MAX_PAYLOAD_BYTES, TIME_MAX_NS, TIME_MIN_NS, VALUE_BOUNDS, TimeWindow
from stresswatch.wire.rejections import Rejections

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
NOW_NS = int(NOW.timestamp()) * 10**9
TOPIC = "stresswatch/v1/ingest/alice"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
# Times and values where the engine's representations end: int64 ns, datetime, float.
edge_ints = st.sampled_from([0, -1, 2**63 - 1, 2**63, 9223372036854775813, -(2**63) - 5, -(2**63), TIME_MIN_NS - 1, TIME_MAX_NS, NOW_NS])
times = st.one_of(st.integers(), edge_ints, st.integers(NOW_NS - 10**12, NOW_NS + 10**12))
values = st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -5.0, 65_536.0, 70_000.0]))
ids = st.one_of(st.sampled_from(["alice", "#", "kim/x", "", "+", "a" * 65, "-x", ".x", "sam\n", "ok_id.1"]), st.text(max_size=70))
iso_times = st.one_of(
    st.sampled_from(["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-11-25T10:00:00+00:00", "2026-11-25T10:00:00", "1999-12-31T23:59:59Z"]),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
)


def decoders(payload: bytes) -> None:
    for decode in (
        lambda: decode_ingest(payload, topic=TOPIC, now=NOW),
        lambda: decode_consent(payload, topic_user="alice", now=NOW),
        lambda: AckMessage.decode(payload),
    ):
        try:
            decode()
        except WireError as exc:
            assert isinstance(exc, ParseError) and exc.reason


@settings(deadline=None)  # a loaded machine's pauses are not what these test
@given(st.binary(max_size=400))
@example(b"\xffSW\x01" + bytes(40))
@example(b'{"schema_version": 1, "user": "alice", "stream_id": "s", "seq": 0, "source": "", "time_ns": [NaN], "metric": ["hr_bpm"], "value": [1]}')
def test_arbitrary_bytes_into_every_decoder_raise_only_parse_error(payload):
    decoders(payload)


@settings(deadline=None)  # a loaded machine's pauses are not what these test
@given(json_values)
def test_arbitrary_json_into_every_decoder_raises_only_parse_error(doc):
    decoders(json.dumps(doc).encode())


def representable_batch(b: IngestBatch, window: tuple[int, int]) -> None:
    frame = b.to_frame()  # the engine's representation: must build
    assert frame.height == len(b.time_ns)
    if b.time_ns:
        assert window[0] <= min(b.time_ns) and max(b.time_ns) <= window[1]
        assert all(math.isfinite(v) for v in b.value)
        for m, v in zip(b.metric, b.value):
            lo, hi = VALUE_BOUNDS[m.value]
            assert lo <= v <= hi


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    user=ids,
    stream_id=ids,
    seq=st.one_of(st.integers(), st.just(2**64)),
    rows=st.lists(st.tuples(times, st.sampled_from(["rr_ms", "hr_bpm", "steps", "motion"]), values), max_size=8),
    binary=st.booleans(),
)
@example(user="alice", stream_id="s", seq=0, rows=[(9223372036854775813, "rr_ms", 800.0)], binary=False)
@example(user="alice", stream_id="s", seq=0, rows=[(-(2**63) - 5, "rr_ms", 800.0)], binary=False)
@example(user="alice", stream_id="s", seq=0, rows=[(NOW_NS, "hr_bpm", float("nan"))], binary=False)
def test_an_ingest_batch_is_refused_or_representable_and_round_trips(user, stream_id, seq, rows, binary):
    doc = {"schema_version": 1, "user": user, "stream_id": stream_id, "seq": seq, "source": "ble_hrs/test",
           "time_ns": [r[0] for r in rows], "metric": [r[1] for r in rows], "value": [r[2] for r in rows]}  # fmt: skip
    payload = json.dumps(doc).encode()  # NaN / Infinity as JSON's non-standard tokens
    window = TimeWindow().ingest_ns(NOW)
    try:
        b = decode_ingest(payload, topic=TOPIC, now=NOW)
    except WireError:
        return
    representable_batch(b, window)
    assert decode_ingest(b.encode(), topic=TOPIC, now=NOW) == b
    if binary:
        assert decode_ingest(b.encode_binary(), topic=TOPIC, now=NOW) == b


@pytest.mark.parametrize("time_ns", [9223372036854775813, -(2**63) - 5, 2**63 - 1, 0])
def test_int64_edge_times_are_refused_in_both_formats(time_ns):
    doc = {"user": "alice", "stream_id": "s", "seq": 0, "source": "x", "time_ns": [time_ns], "metric": ["rr_ms"], "value": [800.0]}
    with pytest.raises(WireError) as err:
        decode_ingest(json.dumps(doc).encode(), topic=TOPIC)
    assert err.value.reason == "time_range"


def test_the_window_around_now_refuses_old_and_future_samples_and_says_which_field():
    ok = IngestBatch(user="alice", stream_id="s", seq=0, source="x", time_ns=[NOW_NS - 10**9], metric=["rr_ms"], value=[800.0])
    assert decode_ingest(ok.encode_binary(), now=NOW) == ok
    for t in (NOW_NS + 11 * 60 * 10**9, NOW_NS - 401 * 86_400 * 10**9):
        late = ok.model_copy(update={"time_ns": [t]})
        for payload in (late.encode(), late.encode_binary()):
            with pytest.raises(WireError) as err:
                decode_ingest(payload, now=NOW)
            assert err.value.reason == "time_range"
    narrow = TimeWindow(max_age_s=60.0, max_future_s=0.0)
    with pytest.raises(WireError):
        decode_ingest(ok.model_copy(update={"time_ns": [NOW_NS - 61 * 10**9]}).encode(), now=NOW, window=narrow)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_json_non_finite_values_are_refused(token):
    payload = ('{"user": "alice", "stream_id": "s", "seq": 0, "source": "x", "time_ns": [%d], "metric": ["hr_bpm"], "value": [%s]}' % (NOW_NS, token)).encode()
    with pytest.raises(WireError) as err:
        decode_ingest(payload, now=NOW)
    assert err.value.reason == "value_range" and token not in str(err.value)


def test_absurd_magnitudes_are_refused_per_metric():
    for metric, value in (("hr_bpm", 65_535.0), ("rr_ms", -1.0), ("steps", 1e9), ("rr_ms", 1e300)):
        b = {"user": "alice", "stream_id": "s", "seq": 0, "source": "x", "time_ns": [NOW_NS], "metric": [metric], "value": [value]}
        with pytest.raises(WireError) as err:
            decode_ingest(json.dumps(b).encode(), now=NOW)
        assert err.value.reason == "value_range"


def test_oversized_payloads_are_refused_before_parsing():
    with pytest.raises(WireError) as err:
        decode_ingest(b"{" + b" " * MAX_PAYLOAD_BYTES + b"}")
    assert err.value.reason == "too_large"
    with pytest.raises(WireError):
        AckMessage.decode(b'{"alert_id": "a", "action": "ack", "x": "' + b"y" * 10_000 + b'"}')


# -- consent ------------------------------------------------------------------------------
def consent_doc(**event) -> bytes:
    ev = {"event_id": "e1", "action": "grant", "at": "2026-11-25T10:00:00+00:00", "via": "cli", "text_version": "2026-11-2",
          "recipients": ["sam"], **event}  # fmt: skip
    return json.dumps({"schema_version": 1, "user": "alice", "events": [ev]}).encode()


@pytest.mark.parametrize("field", ["at", "expires_at"])
@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "1999-12-31T23:59:59+00:00"])
def test_consent_times_where_utc_overflows_are_refused_not_overflow_error(field, value):
    with pytest.raises(WireError) as err:
        decode_consent(consent_doc(**{field: value}), topic_user="alice", now=NOW)
    assert err.value.reason == "time_range" and err.value.field.endswith(field)


def test_a_consent_event_dated_after_now_is_refused_given_the_clock():
    late = (NOW + timedelta(days=2)).isoformat()
    with pytest.raises(WireError):
        decode_consent(consent_doc(at=late), topic_user="alice", now=NOW)
    assert decode_consent(consent_doc(at=late), topic_user="alice")  # no clock: only the absolute range


@pytest.mark.parametrize("recipient", ["#", "kim/x", "", "+", "sam\x00", "a" * 65])
def test_consent_recipients_outside_the_id_grammar_are_refused(recipient):
    with pytest.raises(WireError) as err:
        decode_consent(consent_doc(recipients=["sam", recipient]), topic_user="alice", now=NOW)
    assert err.value.reason == "bad_id" and err.value.field == "events.0.recipients"


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(at=iso_times, expires=st.one_of(st.none(), iso_times), recipients=st.lists(ids, max_size=3), user=ids, event_id=ids)
def test_an_accepted_consent_message_is_stored_and_folded_without_error(tmp_path, at, expires, recipients, user, event_id):
    doc = {"schema_version": 1, "user": user, "events": [{"event_id": event_id, "action": "grant", "at": at, "via": "cli",
           "text_version": "2026-11-2", "recipients": recipients, "expires_at": expires}]}  # fmt: skip
    try:
        events = decode_consent(json.dumps(doc).encode(), topic_user=user, now=NOW)
    except WireError:
        return
    with ConsentLedger(tmp_path / "ledger.sqlite") as ledger:
        ledger.extend(events)
        state = ledger.state(user)
        state.allows_processing(NOW)
        assert not ledger.skipped
        assert decode_consent(encode_consent(user, ledger.events(user)), topic_user=user, now=NOW)


# -- acks and ids ----------------------------------------------------------------------------
def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@settings(deadline=None)  # a loaded machine's pauses are not what these test
@given(alert_id=st.one_of(ids, st.uuids().map(str)), note=st.one_of(st.none(), st.text(max_size=600)))
def test_acks_check_ids_and_notes(alert_id, note):
    doc = {"alert_id": alert_id, "action": "resolve", "outcome": "reached_out", "note": note}
    try:
        m = AckMessage.decode(json.dumps(doc).encode())
    except WireError:
        assert not is_uuid(alert_id) or (note is not None and (len(note) > 500 or not note.replace("\n", " ").replace("\t", " ").isprintable()))
        return
    assert is_uuid(m.alert_id) and AckMessage.decode(m.encode()) == m


@settings(deadline=None)  # a loaded machine's pauses are not what these test
@given(st.text(max_size=70))
def test_a_valid_id_is_a_safe_topic_level(value):
    try:
        validate_id("user", value)
    except ParseError:
        assert not is_valid_id(value)
        return
    assert value and len(value) <= 64 and not set(value) & set("+#/: \x00") and value[0] not in ".-"


# -- rate-limited rejections -------------------------------------------------------------------
def test_a_flood_of_refusals_logs_one_line_per_reason_per_interval_with_counts(caplog):
    t = [0.0]
    rej = Rejections(logging.getLogger("test.rejections"), interval_s=60.0, clock=lambda: t[0])
    err = WireError("values must be finite", reason="value_range", field="value")
    with caplog.at_level(logging.WARNING, logger="test.rejections"):
        for i in range(10_000):
            t[0] = i * 0.01  # 100 s of flood
            rej.record("ingest", err if i % 2 else WireError("bad", reason="malformed"), user="bob")
        rej.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert rej.counts() == {("ingest", "value_range"): 5_000, ("ingest", "malformed"): 5_000}
    # per reason: the first, one at 60 s with the count of the suppressed, one at flush
    assert len(lines) == 6, lines
    assert sum(int(w.split(" more ")[0].split()[-1]) for w in lines if " more " in w) + 4 == 10_000
    assert all("bob" in line for line in lines if "refused a" in line)


def test_a_log_line_never_names_an_id_that_is_not_valid():
    msgs: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            msgs.append(record.getMessage())

    lg = logging.getLogger("test.rejections.ids")
    lg.addHandler(H())
    Rejections(lg).record("consent", "bad_id", user="evil\nforged log line", field_name="topic")
    assert msgs and "evil" not in msgs[0]
