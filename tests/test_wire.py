"""The compact binary ingest payload (stresswatch.wire.binary) and its use by IngestBatch / IngestReceiver."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.wire import binary as wire
from stresswatch.alerts.topics import Topics
from stresswatch.alerts.transport import MqttTransport
from stresswatch.errors import ParseError
from stresswatch.ingest import IngestBatch, IngestReceiver
from stresswatch.model import Metric

T0 = 1_764_000_000 * 10**9


def realistic(n: int = 30, seed: int = 1) -> IngestBatch:
    """A 30-s BLE batch: one RR interval per beat (1/1024 s resolution), beat times in ns."""
    rng = np.random.default_rng(seed)
    rr_ms = np.round(rng.normal(850, 40, n) * 1.024) / 1.024
    t = T0 + np.cumsum(np.round(rr_ms * 1e6)).astype(np.int64)
    return IngestBatch(
        user="peer-3fa1c2",
        stream_id="9b2f6f0e-6a1c-4d1e-9c55-0f4c1b7d2e11",
        seq=42,
        source="ble_hrs/polar-h10",
        time_ns=t.tolist(),
        metric=[Metric.RR_MS] * n,
        value=rr_ms.tolist(),
    )


def test_binary_and_json_decode_to_the_same_batch():
    b = realistic()
    assert IngestBatch.decode(b.encode_binary()) == IngestBatch.decode(b.encode()) == b
    assert IngestBatch.decode(b.encode_binary()).to_frame().equals(b.to_frame())


def test_binary_is_much_smaller_than_json_for_a_live_batch():
    b = realistic()
    binary, text = b.encode_binary(), b.encode()
    assert binary[:3] == wire.MAGIC and text[:1] == b"{"
    assert len(binary) * 3 < len(text)  # ~9 bytes per beat against ~40 in JSON


def test_times_on_whole_milliseconds_use_int32_deltas_and_big_gaps_stay_exact():
    t = [T0, T0 + 1000 * 10**6, T0 + 3_600 * 10**9, T0 + 3_600 * 10**9 + 1]
    payload = wire.encode(user="u", stream_id="s", seq=0, source="", time_ns=t, metric_code=[1] * 4, value=[60.0] * 4)
    assert wire.decode(payload).time_ns == t  # a 1-ns step and a 1-h gap: falls back to int64
    ms = [T0 + k * 10**6 for k in (0, 5, 3_000_000)]
    small = wire.encode(user="u", stream_id="s", seq=0, source="", time_ns=ms, metric_code=[1] * 3, value=[60.0] * 3)
    assert small[4] == wire.TIME_DELTA32 and wire.decode(small).time_ns == ms


@pytest.mark.parametrize(
    ("values", "encoding"),
    [
        ([812.5, 1003.1, 72.0, 0.0], wire.VALUE_I16),  # RR to 0.1 ms, bpm, steps: 2 bytes each
        ([849.609375, 1000.0], wire.VALUE_F32),  # BLE RR: multiples of 1000/1024 ms
        ([812.123456789, 1.0], wire.VALUE_F64),
        ([40000.0], wire.VALUE_F32),  # beyond int16
    ],
)
def test_values_use_the_smallest_lossless_encoding(values, encoding):
    n = len(values)
    payload = wire.encode(user="u", stream_id="s", seq=0, source="", time_ns=list(range(T0, T0 + n)), metric_code=[0] * n, value=values)
    assert payload[6] == encoding and wire.decode(payload).value == values


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p[:10], "header"),
        (lambda p: b"\xffSX" + p[3:], "magic"),
        (lambda p: p[:3] + b"\x02" + p[4:], "version"),
        (lambda p: p[:-1], "length"),
        (lambda p: p + b"\x00", "length"),
        (lambda p: p[:4] + b"\x07" + p[5:], "time_encoding"),
        (lambda p: p[:6] + b"\x09" + p[7:], "value_encoding"),
        (lambda p: p[:7] + b"\x09" + p[8:], "value_exp"),
        (lambda p: p[: wire.HEADER_BYTES] + b"\xff" + p[wire.HEADER_BYTES + 1 :], "user"),
    ],
)
def test_malformed_payloads_name_the_field(mutate, field):
    with pytest.raises(ParseError) as exc:
        IngestBatch.decode(mutate(realistic().encode_binary()), topic="stresswatch/v1/ingest/u")
    assert exc.value.field == field and exc.value.source == "stresswatch/v1/ingest/u"


def test_unknown_metric_code_and_non_finite_values_are_refused():
    good = wire.encode(user="u", stream_id="s", seq=0, source="", time_ns=[T0], metric_code=[0], value=[849.609375])  # float32
    metric_at = len(good) - 4 - 1
    with pytest.raises(ParseError, match="metric code"):
        wire.decode(good[:metric_at] + b"\x09" + good[metric_at + 1 :])
    with pytest.raises(ParseError, match="finite"):
        wire.decode(good[:-4] + struct.pack("<f", float("nan")))


def test_the_sender_cannot_encode_what_the_format_cannot_carry():
    with pytest.raises(ValueError):
        wire.encode(user="u", stream_id="s", seq=0, source="", time_ns=[T0], metric_code=[0, 0], value=[1.0])
    with pytest.raises(ValueError):
        wire.encode(user="u", stream_id="s", seq=0, source="", time_ns=[T0], metric_code=[0], value=[float("inf")])
    with pytest.raises(ValueError):
        wire.encode(user="", stream_id="s", seq=0, source="", time_ns=[], metric_code=[], value=[])


# -- properties ------------------------------------------------------------------------------

@given(st.binary(max_size=400))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_raise_only_parse_error(data):
    for payload in (data, wire.MAGIC + data, wire.MAGIC + b"\x01" + data):
        ident = wire.identity(payload)  # the restart's header-only read never raises
        assert ident is None or (isinstance(ident[0], str) and isinstance(ident[1], str) and ident[2] >= 0)
        try:
            wire.decode(payload)
        except ParseError:
            pass
        try:
            IngestBatch.decode(payload)
        except ParseError:
            pass


@given(st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_corrupting_a_valid_payload_raises_only_parse_error(data):
    payload = bytearray(realistic(data.draw(st.integers(0, 40)), data.draw(st.integers(0, 99))).encode_binary())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        IngestBatch.decode(bytes(payload))
    except ParseError:
        pass


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def batches(draw):
    n = draw(st.integers(0, 60))
    start = draw(st.integers(-(2**61), 2**61))
    step = draw(st.sampled_from([1, 1000, 10**6, 10**9]))
    deltas = draw(st.lists(st.integers(-(10**12), 10**12) if step == 1 else st.integers(-5000, 5000), min_size=n, max_size=n))
    times = (start + np.cumsum(np.array(deltas, dtype=np.int64) * step)).tolist() if n else []
    codes = draw(st.lists(st.integers(0, len(wire.METRICS) - 1), min_size=n, max_size=n))
    values = draw(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=draw(st.sampled_from([32, 64]))), min_size=n, max_size=n))
    return dict(
        user=draw(_text),
        stream_id=draw(_text),
        seq=draw(st.integers(0, 2**64 - 1)),
        source=draw(st.text(max_size=30)),
        time_ns=times,
        metric_code=codes,
        value=values,
    )


@given(batches())
@settings(max_examples=300, deadline=None)
def test_round_trip_is_exact(b):
    if any(abs(t) >= 2**62 for t in b["time_ns"]):
        with pytest.raises(ValueError):
            wire.encode(**b)
        return
    payload = wire.encode(**b)
    out = wire.decode(payload)
    assert (out.user, out.stream_id, out.seq, out.source) == (b["user"], b["stream_id"], b["seq"], b["source"])
    assert wire.identity(payload) == (b["user"], b["stream_id"], b["seq"])  # the header alone says the same
    assert out.time_ns == b["time_ns"]
    assert out.metric_code == b["metric_code"]
    assert out.value == b["value"]


# -- through a real Mosquitto -------------------------------------------------------------------

@pytest.mark.mosquitto
def test_receiver_accepts_binary_and_json_batches_and_dedupes_across_formats(mosquitto):
    got: list[IngestBatch] = []
    rx = IngestReceiver(mosquitto.url, got.append)
    tx = MqttTransport(mosquitto.url, client_id="companion-wire")
    topics = Topics()
    b0, b1 = realistic(seed=1), realistic(seed=2).model_copy(update={"seq": 43})
    try:
        tx.publish(topics.ingest(b0.user), b0.encode_binary())
        tx.publish(topics.ingest(b0.user), b0.encode())  # the same batch again, as JSON: a duplicate
        tx.publish(topics.ingest(b1.user), b1.encode())
        tx.publish(topics.ingest(b1.user), wire.MAGIC + b"\x01garbage")
        tx.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (rx.accepted == 2 and rx.duplicates == 1 and rx.rejected):
            time.sleep(0.02)
    finally:
        tx.close()
        rx.close()
    assert got == [b0, b1]
    assert rx.duplicates == 1
    assert len(rx.rejected) == 1 and rx.rejected[0].reason.startswith("malformed payload")
