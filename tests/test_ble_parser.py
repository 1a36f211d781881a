"""Heart Rate Measurement (0x2A37) and Body Sensor Location (0x2A38) parsers, scalar and batch."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.errors import ParseError
from stresswatch_adapters.ble_hrs.batch import pack, parse_batch, parse_many
from stresswatch_adapters.ble_hrs.parser import (
    BodySensorLocation,
    HrFormat,
    SensorContact,
    encode_heart_rate_measurement,
    parse_body_sensor_location,
    parse_heart_rate_measurement,
)
from stresswatch_adapters.ble_hrs.recording import read_recording

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ble"


# --- the three test vectors of the shared data README ------------------------------------


def test_vector_uint8_hr_with_one_rr():
    m = parse_heart_rate_measurement(bytes.fromhex("10 48 00 04"))
    assert (m.hr_bpm, m.rr_ms, m.hr_format) == (72, (1000.0,), HrFormat.UINT8)
    assert m.sensor_contact is SensorContact.NOT_SUPPORTED and m.energy_expended_kj is None


def test_vector_contact_with_two_rr():
    m = parse_heart_rate_measurement(bytes.fromhex("16 3C 1A 03 2E 03"))
    assert m.sensor_contact is SensorContact.CONTACT
    assert m.hr_bpm == 60
    assert m.rr_ms == pytest.approx((775.4, 794.9), abs=0.05)
    assert m.rr_1024 == (794, 814)


def test_vector_uint16_hr_energy_and_rr():
    m = parse_heart_rate_measurement(bytes.fromhex("19 48 00 10 00 00 04"))
    assert (m.hr_format, m.hr_bpm, m.energy_expended_kj, m.rr_ms) == (HrFormat.UINT16, 72, 16, (1000.0,))


# --- the full flag matrix ----------------------------------------------------------------

MATRIX = list(itertools.product((False, True), (0, 1, 2, 3), (False, True), (0, 1, 2, 4)))


@pytest.mark.parametrize("uint16,contact_bits,energy,n_rr", MATRIX)
def test_flag_matrix(uint16, contact_bits, energy, n_rr):
    hr = 180 if not uint16 else 0x0102  # 258: only representable as uint16, and implausible
    rr = [700 + 11 * i for i in range(n_rr)]
    data = encode_heart_rate_measurement(hr_bpm=hr, contact_bits=contact_bits, uint16=uint16, energy_kj=513 if energy else None, rr_1024=rr)
    m = parse_heart_rate_measurement(data)
    assert m.hr_format is (HrFormat.UINT16 if uint16 else HrFormat.UINT8)
    assert m.hr_raw_bpm == hr
    expected_contact = {0: SensorContact.NOT_SUPPORTED, 1: SensorContact.NOT_SUPPORTED, 2: SensorContact.NO_CONTACT, 3: SensorContact.CONTACT}
    assert m.sensor_contact is expected_contact[contact_bits]
    assert m.energy_expended_kj == (513 if energy else None)
    assert m.rr_1024 == tuple(rr)
    no_contact = contact_bits == 2
    # missing data is None, never a calm reading
    assert m.hr_bpm == (None if no_contact or uint16 else 180)
    assert m.rr_ms == tuple(None if no_contact else r * 1000 / 1024 for r in rr)
    assert parse_many([data]).row(0) == m


def test_rr_is_converted_from_1024ths_not_left_raw():
    m = parse_heart_rate_measurement(encode_heart_rate_measurement(hr_bpm=60, rr_1024=[1024, 512 + 256]))
    assert m.rr_ms == (1000.0, 750.0)


def test_implausible_values_become_missing():
    m = parse_heart_rate_measurement(encode_heart_rate_measurement(hr_bpm=0, rr_1024=[65535, 100, 820]))
    assert m.hr_bpm is None and m.hr_raw_bpm == 0
    assert m.rr_ms[0] is None and m.rr_ms[1] is None and m.rr_ms[2] == pytest.approx(800.78, abs=0.01)


def test_no_contact_is_never_a_reading():
    m = parse_heart_rate_measurement(encode_heart_rate_measurement(hr_bpm=62, contact=SensorContact.NO_CONTACT, rr_1024=[980]))
    assert not m.usable and m.hr_bpm is None and m.rr_ms == (None,)


def test_zero_rr_with_rr_flag_is_accepted_as_no_intervals():
    assert parse_heart_rate_measurement(bytes.fromhex("10 48")).rr_ms == ()


@pytest.mark.parametrize(
    "hexdata,position,field",
    [
        ("", 0, "flags"),
        ("00", 1, "heart_rate"),
        ("01 48", 1, "heart_rate"),
        ("09 48 00 10", 3, "energy_expended"),
        ("10 48 00 04 01", 4, "rr_interval"),
        ("00 48 00 04", 2, "flags"),
    ],
)
def test_malformed_names_position_and_field(hexdata, position, field):
    with pytest.raises(ParseError) as err:
        parse_heart_rate_measurement(bytes.fromhex(hexdata), source="strap")
    assert (err.value.position, err.value.field, err.value.source) == (position, field, "strap")


def test_batch_error_names_notification_and_byte():
    with pytest.raises(ParseError) as err:
        parse_many([bytes.fromhex("10 48 00 04"), bytes.fromhex("10 48 00 04 01")], source="rec")
    assert err.value.position == "notification 1 byte 4" and err.value.field == "rr_interval"


def test_body_sensor_location():
    assert parse_body_sensor_location(b"\x01") is BodySensorLocation.CHEST
    assert parse_body_sensor_location(b"\x02") is BodySensorLocation.WRIST
    for bad in (b"", b"\x07", b"\x01\x02"):
        with pytest.raises(ParseError) as err:
            parse_body_sensor_location(bad)
        assert err.value.field == "body_sensor_location"


def test_flag_matrix_fixture_parses_identically_in_batch_and_scalar():
    notes = [e.data for e in read_recording(FIXTURES / "flag_matrix.ble.jsonl").notifications]
    flags = {d[0] & 0x1F for d in notes}
    assert flags == set(range(32))  # every combination of the five defined flag bits
    batch = parse_many(notes)
    assert [batch.row(i) for i in range(len(notes))] == [parse_heart_rate_measurement(d) for d in notes]
    assert batch.rr_counts.max() >= 4  # several RR intervals in one notification


# --- properties --------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_raise_only_parse_error(data):
    try:
        m = parse_heart_rate_measurement(data)
    except ParseError:
        return
    assert m.hr_bpm is None or 25 <= m.hr_bpm <= 250
    assert all(v is None or 200 <= v <= 3000 for v in m.rr_ms)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=24), max_size=30))
def test_batch_equals_scalar(notifications):
    try:
        expected = [parse_heart_rate_measurement(d) for d in notifications]
    except ParseError as exc:
        with pytest.raises(ParseError) as err:
            parse_many(notifications)
        first_bad = next(i for i, d in enumerate(notifications) if _fails(d))
        assert err.value.position == f"notification {first_bad} byte {exc.position}"
        assert err.value.field == exc.field
        return
    batch = parse_many(notifications)
    assert [batch.row(i) for i in range(len(notifications))] == expected
    assert len(batch.rr_ms) == sum(len(m.rr_ms) for m in expected)


def _fails(data: bytes) -> bool:
    try:
        parse_heart_rate_measurement(data)
    except ParseError:
        return True
    return False


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 250), max_size=20))
def test_batch_on_arbitrary_buffers_and_offsets_raises_only_parse_error(buf, cuts):
    offsets = np.array(sorted(cuts), dtype=np.int64)
    try:
        parse_batch(np.frombuffer(buf, dtype=np.uint8), offsets)
    except ParseError:
        pass


def test_pack_round_trip():
    notes = [b"\x10\x48\x00\x04", b"\x00\x50"]
    buf, offsets = pack(notes)
    assert offsets.tolist() == [0, 4, 6] and buf.tobytes() == b"".join(notes)
    b = parse_batch(buf, offsets)
    assert b.hr_bpm.tolist() == [72.0, 80.0] and math.isnan(b.energy_expended_kj[0])
