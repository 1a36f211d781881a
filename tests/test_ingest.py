"""Ingest wire format and exactly-once deduplication."""

import json

from datetime import datetime, timezone

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.errors import ParseError
from stresswatch.ingest import Deduplicator, IngestBatch
from stresswatch.model import validate_samples


def frame() -> pl.DataFrame:
    t0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
    return validate_samples(
        pl.DataFrame({"user": "alice", "time": [t0, t0], "metric": ["rr_ms", "hr_bpm"], "value": [812.5, 74.0], "source": "s"})
    )


def test_round_trip_keeps_every_sample():
    b = IngestBatch.from_frame(frame(), user="alice", stream_id="s1", seq=3, source="s")
    back = IngestBatch.decode(b.encode())
    assert back == b
    assert back.to_frame().equals(frame())


def test_malformed_payload_names_the_field():
    b = IngestBatch.from_frame(frame(), user="alice", stream_id="s1", seq=3, source="s").model_dump()
    b["metric"] = ["rr_ms", "spo2"]
    with pytest.raises(ParseError) as err:
        IngestBatch.decode(json.dumps(b).encode())
    assert err.value.field and err.value.field.startswith("metric")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_parse_error(data):
    try:
        IngestBatch.decode(data)
    except ParseError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=120))
def test_deduplicator_passes_each_seq_exactly_once(seqs):
    d = Deduplicator()
    passed = [s for s in seqs if d.first_time(IngestBatch(user="u", stream_id="x", seq=s, source="", time_ns=[], metric=[], value=[]))]
    assert sorted(passed) == sorted(set(seqs))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["ann", "bob", "cy"]), st.sampled_from(["s1", "s2", "s3"]), st.integers(0, 12) | st.integers(2**64 - 4, 2**64 - 1)),
        max_size=150,
    )
)
def test_deduplicator_passes_each_user_stream_seq_exactly_once_whatever_the_interleaving(triples):
    """Users switching between streams (a restarted companion, an import), out of order, and
    seqs at the end of the uint64 range: the compact floors agree with a set of everything seen."""
    d = Deduplicator()
    seen: set[tuple[str, str, int]] = set()
    for user, stream, seq in triples:
        b = IngestBatch(user=user, stream_id=stream, seq=seq, source="", time_ns=[], metric=[], value=[])
        assert d.seen(b) == ((user, stream, seq) in seen)
        assert d.first_time(b) == ((user, stream, seq) not in seen)
        seen.add((user, stream, seq))
        assert d.seen(b)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["s1", "s2", "s3"]), st.integers(0, 40)), max_size=80),
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["s1", "s2", "s3"]), st.integers(0, 45)), max_size=40),
)
def test_deduplicator_state_carried_to_another_owner_answers_the_same(seen, later):
    """Cluster takeover carries the floors in a snapshot: the next owner must refuse exactly
    what the previous one would have refused, and pass everything else once."""
    def b(user: str, stream: str, seq: int) -> IngestBatch:
        return IngestBatch(user=user, stream_id=stream, seq=seq, source="", time_ns=[], metric=[], value=[])

    d = Deduplicator()
    for key in seen:
        d.first_time(b(*key))
    carried = Deduplicator.from_state(json.loads(json.dumps(d.to_state())))
    assert [carried.first_time(b(*k)) for k in later] == [d.first_time(b(*k)) for k in later]


# --- the engine's receiver, against a real Mosquitto -------------------------------------

import time


from stresswatch.alerts.topics import Topics
from stresswatch.alerts.transport import MqttTransport
from stresswatch.ingest import IngestReceiver


def batch(user: str, seq: int, stream_id: str = "s1") -> IngestBatch:
    return IngestBatch.from_frame(frame().with_columns(pl.lit(user).alias("user")), user=user, stream_id=stream_id, seq=seq, source="s")


def wait_until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.mark.mosquitto
def test_receiver_passes_each_batch_once_and_rejects_foreign_or_malformed(mosquitto):
    got: list[IngestBatch] = []
    rx = IngestReceiver(mosquitto.url, got.append)
    tx = MqttTransport(mosquitto.url, client_id="companion-alice")
    topics = Topics()
    try:
        for seq in (0, 1, 1, 0, 2):  # a companion's buffer re-sends after a lost PUBACK
            tx.publish(topics.ingest("alice"), batch("alice", seq).encode())
        tx.publish(topics.ingest("mallory"), batch("alice", 3).encode())  # speaks for someone else
        tx.publish(topics.ingest("alice"), b"{not json")
        tx.flush()
        wait_until(lambda: len(rx.rejected) == 2 and rx.accepted + rx.duplicates == 5)
    finally:
        tx.close()
        rx.close()
    assert [b.seq for b in got] == [0, 1, 2]
    assert rx.duplicates == 2
    reasons = sorted(r.reason for r in rx.rejected)
    assert reasons[0].startswith("malformed payload") and "differs" in reasons[1]
    assert all("812.5" not in r.reason for r in rx.rejected)


@pytest.mark.mosquitto
def test_batches_sent_while_the_engine_is_away_arrive_when_it_returns(mosquitto):
    got: list[IngestBatch] = []
    rx = IngestReceiver(mosquitto.url, got.append)
    rx.close()  # the persistent session stays on the broker
    tx = MqttTransport(mosquitto.url, client_id="companion-bob")
    for seq in range(5):
        tx.publish(Topics().ingest("bob"), batch("bob", seq).encode())
    tx.close()
    rx = IngestReceiver(mosquitto.url, got.append)
    try:
        wait_until(lambda: len(got) == 5)
    finally:
        rx.close()
    assert [b.seq for b in got] == list(range(5))


@pytest.mark.mosquitto
def test_a_failing_callback_does_not_mark_the_batch_seen(mosquitto):
    calls: list[int] = []

    def flaky(b: IngestBatch) -> None:
        calls.append(b.seq)
        if len(calls) == 1:
            raise RuntimeError("engine hiccup")

    rx = IngestReceiver(mosquitto.url, flaky)
    tx = MqttTransport(mosquitto.url, client_id="companion-carol")
    try:
        tx.publish(Topics().ingest("carol"), batch("carol", 0).encode())
        tx.flush()
        wait_until(lambda: rx.failed == 1)
        tx.publish(Topics().ingest("carol"), batch("carol", 0).encode())  # the companion retries
        tx.flush()
        wait_until(lambda: rx.accepted == 1)
    finally:
        tx.close()
        rx.close()
    assert calls == [0, 0]
