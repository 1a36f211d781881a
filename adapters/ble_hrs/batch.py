"""Vectorised Heart Rate Measurement parser for many notifications at once (numpy).

Input is the notifications packed into one ``uint8`` buffer plus ``offsets`` (``n + 1``
int64 boundaries); :func:`pack` builds that from a
list of ``bytes``. Output is columnar (:class:`HrmBatch`): one row per notification and a
flat RR array with the index of the notification each interval came from. Missing data is
NaN here where the scalar parser says ``None``; otherwise the two agree exactly (tested).

Malformed input: the first bad notification is re-parsed by the scalar parser so the
:class:`~stresswatch.errors.ParseError` is the same one, with ``position``
``"notification N byte B"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stresswatch.errors import ParseError

from .parser import (
    FLAG_ENERGY,
    FLAG_HR_UINT16,
    FLAG_RR,
    HR_PLAUSIBLE_BPM,
    RR_PLAUSIBLE_MS,
    RR_UNITS_PER_S,
    HeartRateMeasurement,
    SensorContact,
    parse_heart_rate_measurement,
)


@dataclass(frozen=True)
class HrmBatch:
    """Columns of ``n`` notifications. ``rr_notification[i]`` is the row of ``rr_ms[i]``."""

    flags: np.ndarray  # uint8 (n,)
    sensor_contact: np.ndarray  # int8 (n,): SensorContact values 0, 2, 3
    hr_raw_bpm: np.ndarray  # int32 (n,)
    hr_bpm: np.ndarray  # float64 (n,), NaN = missing (no contact / implausible)
    energy_expended_kj: np.ndarray  # float64 (n,), NaN = not present
    rr_1024: np.ndarray  # uint16 (m,)
    rr_ms: np.ndarray  # float64 (m,), NaN = missing
    rr_notification: np.ndarray  # int64 (m,)
    rr_counts: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return int(self.flags.shape[0])

    def row(self, i: int) -> HeartRateMeasurement:
        """Notification ``i`` as the scalar dataclass (NaN -> None), for comparison and debugging."""
        start = int(self.rr_counts[:i].sum())
        end = start + int(self.rr_counts[i])
        from .parser import HrFormat

        def opt_int(v: float) -> int | None:
            return None if np.isnan(v) else int(v)

        return HeartRateMeasurement(
            flags=int(self.flags[i]),
            hr_format=HrFormat(int(self.flags[i]) & FLAG_HR_UINT16),
            sensor_contact=SensorContact(int(self.sensor_contact[i])),
            hr_raw_bpm=int(self.hr_raw_bpm[i]),
            hr_bpm=opt_int(self.hr_bpm[i]),
            energy_expended_kj=opt_int(self.energy_expended_kj[i]),
            rr_1024=tuple(int(v) for v in self.rr_1024[start:end]),
            rr_ms=tuple(None if np.isnan(v) else float(v) for v in self.rr_ms[start:end]),
        )


def pack(notifications: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(buffer uint8, offsets int64 of length n + 1) for a list of notification values."""
    lengths = np.fromiter(map(len, notifications), dtype=np.int64, count=len(notifications))
    offsets = np.zeros(len(notifications) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buf = np.frombuffer(b"".join(notifications), dtype=np.uint8)
    return buf, offsets


def parse_many(notifications: Sequence[bytes], *, source: str | None = None) -> HrmBatch:
    return parse_batch(*pack(notifications), source=source)


def _fail(buf: np.ndarray, offsets: np.ndarray, i: int, source: str | None) -> ParseError:
    data = buf[offsets[i] : offsets[i + 1]].tobytes()
    try:
        parse_heart_rate_measurement(data, source=source)
    except ParseError as exc:
        return ParseError(exc.message, source=source, position=f"notification {i} byte {exc.position}", field=exc.field)
    raise AssertionError(f"batch and scalar parsers disagree on notification {i}: {data.hex()}")  # pragma: no cover


def parse_batch(buf: np.ndarray, offsets: np.ndarray, *, source: str | None = None) -> HrmBatch:
    """Parse ``n = len(offsets) - 1`` notifications stored back to back in ``buf``."""
    buf = np.asarray(buf, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = offsets.shape[0] - 1
    if n < 0 or (n > 0 and (offsets[0] < 0 or offsets[-1] > buf.shape[0] or np.any(np.diff(offsets) < 0))):
        raise ParseError("offsets do not describe the buffer", source=source, field="offsets")
    # Two zero bytes of padding so fixed-position reads past a short notification stay in bounds;
    # such notifications are rejected below before any value from the padding is used.
    padded = np.concatenate([buf, np.zeros(4, dtype=np.uint8)])
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    empty = lengths == 0
    flags = padded[starts]
    u16 = (flags & FLAG_HR_UINT16).astype(np.int64)
    has_energy = (flags & FLAG_ENERGY) != 0
    has_rr = (flags & FLAG_RR) != 0
    header = 2 + u16 + 2 * has_energy
    rr_bytes = lengths - header
    bad = empty | (rr_bytes < 0) | (has_rr & (rr_bytes % 2 == 1)) | (~has_rr & (rr_bytes > 0))
    if bad.any():
        raise _fail(buf, offsets, int(np.argmax(bad)), source)

    hr_raw = padded[starts + 1].astype(np.int32) | ((padded[starts + 2].astype(np.int32) << 8) * u16.astype(np.int32))
    epos = starts + 2 + u16
    energy = padded[epos].astype(np.float64) + padded[epos + 1].astype(np.float64) * 256.0
    energy[~has_energy] = np.nan

    contact_bits = (flags >> 1) & 3
    contact = np.where(contact_bits < 2, 0, contact_bits).astype(np.int8)
    no_contact = contact == SensorContact.NO_CONTACT
    lo, hi = HR_PLAUSIBLE_BPM
    hr = hr_raw.astype(np.float64)
    hr[no_contact | (hr_raw < lo) | (hr_raw > hi)] = np.nan

    counts = np.where(has_rr, rr_bytes // 2, 0)
    m = int(counts.sum())
    row = np.repeat(np.arange(n, dtype=np.int64), counts)
    first_rr = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(counts[:-1], out=first_rr[1:])
    k = np.arange(m, dtype=np.int64) - first_rr[row]
    pos = (starts + header)[row] + 2 * k
    rr_raw = padded[pos].astype(np.uint16) | (padded[pos + 1].astype(np.uint16) << 8)
    rr_ms = rr_raw.astype(np.float64) * (1000.0 / RR_UNITS_PER_S)
    rlo, rhi = RR_PLAUSIBLE_MS
    rr_ms[no_contact[row] | (rr_ms < rlo) | (rr_ms > rhi)] = np.nan
    return HrmBatch(
        flags=flags,
        sensor_contact=contact,
        hr_raw_bpm=hr_raw,
        hr_bpm=hr,
        energy_expended_kj=energy,
        rr_1024=rr_raw,
        rr_ms=rr_ms,
        rr_notification=row,
        rr_counts=counts,
    )
