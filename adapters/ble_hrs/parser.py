"""Pure parsers for the Bluetooth Heart Rate Service characteristics (bytes -> frozen dataclass).

Heart Rate Measurement (0x2A37), per the Bluetooth SIG Heart Rate Service 1.0 spec::

    byte 0      flags
                  bit 0     heart-rate value format: 0 = uint8, 1 = uint16 (little-endian)
                  bits 1-2  sensor contact: 0b00/0b01 not supported, 0b10 no contact, 0b11 contact
                  bit 3     energy expended present (uint16, kJ)
                  bit 4     RR intervals present (uint16 each, units of 1/1024 s, oldest first)
                  bits 5-7  reserved for future use (ignored, as the spec tells receivers to)
    byte 1..    heart rate (1 or 2 bytes), [energy expended (2)], [RR interval (2)]...

Missing data is never a calm reading: a notification that reports "no contact" yields no
heart rate and no RR intervals, a heart rate outside :data:`HR_PLAUSIBLE_BPM` (devices send 0
while they have no lock) yields ``hr_bpm=None``, and an RR interval outside
:data:`RR_PLAUSIBLE_MS` yields ``None`` at its position. The raw values stay available
(``hr_raw_bpm``, ``rr_1024``) for recordings and diagnostics.

Anything malformed (empty, truncated field, odd RR byte, bytes after the last field) raises
:class:`~stresswatch.errors.ParseError` with the byte position and the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from stresswatch.errors import ParseError

HEART_RATE_SERVICE_UUID = "0000180d-0000-1000-8000-00805f9b34fb"
HEART_RATE_MEASUREMENT_UUID = "00002a37-0000-1000-8000-00805f9b34fb"
BODY_SENSOR_LOCATION_UUID = "00002a38-0000-1000-8000-00805f9b34fb"

HR_PLAUSIBLE_BPM = (25, 250)  # inclusive; outside: no lock or a glitch, not a heart rate
RR_PLAUSIBLE_MS = (200.0, 3000.0)  # inclusive; 300 bpm .. 20 bpm
RR_UNITS_PER_S = 1024

FLAG_HR_UINT16 = 0x01
FLAG_CONTACT_MASK = 0x06
FLAG_ENERGY = 0x08
FLAG_RR = 0x10


class SensorContact(enum.IntEnum):
    """Sensor-contact status (flags bits 1-2). Values 0 and 1 both mean "not supported"."""

    NOT_SUPPORTED = 0
    NO_CONTACT = 2
    CONTACT = 3

    @classmethod
    def from_flags(cls, flags: int) -> SensorContact:
        bits = (flags & FLAG_CONTACT_MASK) >> 1
        return cls.NOT_SUPPORTED if bits < 2 else cls(bits)


class HrFormat(enum.IntEnum):
    UINT8 = 0
    UINT16 = 1


@dataclass(frozen=True, slots=True)
class HeartRateMeasurement:
    """One 0x2A37 notification. ``None`` means missing data, never zero."""

    flags: int
    hr_format: HrFormat
    sensor_contact: SensorContact
    hr_raw_bpm: int
    hr_bpm: int | None
    energy_expended_kj: int | None
    rr_1024: tuple[int, ...]
    rr_ms: tuple[float | None, ...]

    @property
    def usable(self) -> bool:
        """False when the sensor says it has no skin contact: nothing here is a reading."""
        return self.sensor_contact is not SensorContact.NO_CONTACT


def rr_1024_to_ms(value: int) -> float:
    """1/1024 s -> ms, exactly (no rounding: 1000/1024 = 0.9765625 is exact in binary)."""
    return value * 1000.0 / RR_UNITS_PER_S


def _u16(data: bytes, pos: int, field: str, source: str | None) -> int:
    if pos + 2 > len(data):
        raise ParseError(
            f"notification ends inside {field} ({len(data)} bytes, need {pos + 2})", source=source, position=pos, field=field
        )
    return data[pos] | (data[pos + 1] << 8)


def parse_heart_rate_measurement(data: bytes, *, source: str | None = None) -> HeartRateMeasurement:
    """Parse one Heart Rate Measurement value; :class:`ParseError` names byte position and field."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"expected bytes, got {type(data).__name__}", source=source, position=0, field="flags")
    data = bytes(data)
    if not data:
        raise ParseError("empty notification", source=source, position=0, field="flags")
    flags = data[0]
    contact = SensorContact.from_flags(flags)
    pos = 1
    if flags & FLAG_HR_UINT16:
        hr_raw = _u16(data, pos, "heart_rate", source)
        pos += 2
    else:
        if pos >= len(data):
            raise ParseError("notification ends before heart_rate", source=source, position=pos, field="heart_rate")
        hr_raw = data[pos]
        pos += 1
    energy: int | None = None
    if flags & FLAG_ENERGY:
        energy = _u16(data, pos, "energy_expended", source)
        pos += 2
    rr_raw: list[int] = []
    if flags & FLAG_RR:
        if (len(data) - pos) % 2:
            raise ParseError("odd number of RR bytes", source=source, position=len(data) - 1, field="rr_interval")
        while pos < len(data):
            rr_raw.append(data[pos] | (data[pos + 1] << 8))
            pos += 2
    elif pos < len(data):
        raise ParseError(
            f"{len(data) - pos} unexpected byte(s) after the last field (RR flag not set)",
            source=source,
            position=pos,
            field="flags",
        )
    no_contact = contact is SensorContact.NO_CONTACT
    lo, hi = HR_PLAUSIBLE_BPM
    hr = hr_raw if (not no_contact and lo <= hr_raw <= hi) else None
    rlo, rhi = RR_PLAUSIBLE_MS
    rr_ms: list[float | None] = []
    for raw in rr_raw:
        ms = rr_1024_to_ms(raw)
        rr_ms.append(ms if (not no_contact and rlo <= ms <= rhi) else None)
    return HeartRateMeasurement(
        flags=flags,
        hr_format=HrFormat(flags & FLAG_HR_UINT16),
        sensor_contact=contact,
        hr_raw_bpm=hr_raw,
        hr_bpm=hr,
        energy_expended_kj=energy,
        rr_1024=tuple(rr_raw),
        rr_ms=tuple(rr_ms),
    )


class BodySensorLocation(enum.IntEnum):
    """Body Sensor Location (0x2A38), one uint8."""

    OTHER = 0
    CHEST = 1
    WRIST = 2
    FINGER = 3
    HAND = 4
    EAR_LOBE = 5
    FOOT = 6


def parse_body_sensor_location(data: bytes, *, source: str | None = None) -> BodySensorLocation:
    """Parse 0x2A38: exactly one byte, 0..6 (7..255 are reserved: an error, not a guess)."""
    data = bytes(data)
    if len(data) != 1:
        raise ParseError(f"expected 1 byte, got {len(data)}", source=source, position=min(len(data), 1), field="body_sensor_location")
    try:
        return BodySensorLocation(data[0])
    except ValueError:
        raise ParseError(f"reserved value {data[0]}", source=source, position=0, field="body_sensor_location") from None


def encode_heart_rate_measurement(
    *,
    hr_bpm: int,
    contact: SensorContact | int = SensorContact.CONTACT,
    uint16: bool = False,
    energy_kj: int | None = None,
    rr_1024: tuple[int, ...] | list[int] = (),
    rr_flag: bool | None = None,
    contact_bits: int | None = None,
) -> bytes:
    """The inverse of the parser, for fixtures and tests (``contact_bits`` forces raw bits 1-2)."""
    bits = int(contact) if contact_bits is None else contact_bits
    with_rr = bool(rr_1024) if rr_flag is None else rr_flag
    flags = (FLAG_HR_UINT16 if uint16 else 0) | ((bits & 3) << 1) | (FLAG_ENERGY if energy_kj is not None else 0)
    flags |= FLAG_RR if with_rr else 0
    out = bytearray([flags])
    out += hr_bpm.to_bytes(2 if uint16 else 1, "little")
    if energy_kj is not None:
        out += energy_kj.to_bytes(2, "little")
    for rr in rr_1024:
        out += int(rr).to_bytes(2, "little")
    return bytes(out)
