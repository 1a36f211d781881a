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
