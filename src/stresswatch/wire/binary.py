"""Compact binary ingest payload (``SWB``, version 1): a sample batch as columns of fixed-width numbers.

Pure bytes in, bytes out; no I/O. :func:`decode` raises only :class:`~stresswatch.errors.WireError`
(a ``ParseError``), whatever the bytes; :func:`stresswatch.wire.ingest.decode_ingest` then applies
the range checks every ingest message gets. The JSON payload of
:class:`stresswatch.wire.ingest.IngestBatch` carries the same
fields; this one is 4-7x smaller and decodes into numpy arrays without a per-sample Python
object (measured in ``benchmarks/load/bench_wire.py``; layout and versioning in ``docs/INGEST.md``).
Every encoding choice is lossless: the decoded batch equals the encoded one exactly.

A payload starts with the magic bytes ``FF 53 57`` (``0xFF "SW"``). ``0xFF`` never occurs in UTF-8
text, so no JSON payload can start like this: the receiver tells the formats apart by the
first byte, over MQTT 3.1.1 as well as 5, without a content-type property.

Layout (little-endian)::

    offset  size  field
    0       3     magic FF 53 57
    3       1     version = 1
    4       1     time_encoding: 0 = n x int64 ns since the epoch; 1 = int64 t0 + (n-1) x int32 deltas
    5       1     time_exp: deltas are in units of 10**time_exp ns (0..9; 0 when time_encoding = 0)
    6       1     value_encoding: 0 = float64; 1 = float32; 2 = int16 in units of 10**-value_exp
    7       1     value_exp: decimal digits of an int16 value (0..4; 0 otherwise)
    8       8     seq (uint64)
    16      4     n samples (uint32, <= MAX_SAMPLES)
    20      2     user length (bytes), 22: stream_id length, 24: source length (uint16 each)
    26      ...   user, stream_id, source (UTF-8), then the time, metric (n x uint8) and value columns
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import mul, truediv

import numpy as np

from ..errors import WireError
from .limits import MAX_BATCH_SAMPLES

MAGIC = b"\xffSW"
VERSION = 1
MAX_SAMPLES = MAX_BATCH_SAMPLES  # same bound as the JSON format
MAX_STREAM_ID = 64
# Wire codes are part of the format: append only, never renumber.
METRICS: tuple[str, ...] = ("rr_ms", "hr_bpm", "steps", "motion")
METRIC_CODE = {m: i for i, m in enumerate(METRICS)}

_HEADER = struct.Struct("<3sBBBBBQIHHH")
HEADER_BYTES = _HEADER.size  # 26
TIME_ABSOLUTE, TIME_DELTA32 = 0, 1
VALUE_F64, VALUE_F32, VALUE_I16 = 0, 1, 2
MAX_VALUE_EXP = 4
_I16 = np.iinfo(np.int16)
_I32 = np.iinfo(np.int32)
_SAFE_NS = 2**62  # reconstructed times must stay well inside int64
_BIG_ENDIAN = sys.byteorder == "big"


@dataclass(frozen=True)
class WireBatch:
    """A decoded batch: the header strings and three equal-length columns."""

    user: str
    stream_id: str
    seq: int
    source: str
    time_ns: list[int]
    metric_code: list[int]  # index into METRICS
    value: list[float]

    @property
    def metrics(self) -> list[str]:
        return [METRICS[c] for c in self.metric_code]


def is_binary(payload: bytes) -> bool:
    """Whether ``payload`` is meant for this decoder: its first byte is 0xFF, which UTF-8 (so
    JSON) never contains; the decoder then checks the rest of the magic and the version."""
    return payload[:1] == b"\xff"


def encode(
    *,
    user: str,
    stream_id: str,
    seq: int,
    source: str,
    time_ns: np.ndarray | list[int],
    metric_code: np.ndarray | list[int],
    value: np.ndarray | list[float],
) -> bytes:
    """Encode one batch, choosing the smallest lossless time and value encodings.

    Raises ``ValueError`` for input the format cannot carry (this is the sender's bug, not
    malformed bytes): columns of different lengths, too many samples, an unknown metric code,
    non-finite values, strings too long, a negative seq.
    """
    t = np.asarray(time_ns, dtype=np.int64)
    m = np.asarray(metric_code, dtype=np.int64)
    v = np.asarray(value, dtype=np.float64)
    n = len(t)
    if not n == len(m) == len(v):
        raise ValueError("time_ns, metric_code and value must have the same length")
    if n > MAX_SAMPLES:
        raise ValueError(f"at most {MAX_SAMPLES} samples per batch")
    if n and (m.min() < 0 or m.max() >= len(METRICS)):
        raise ValueError("unknown metric code")
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite")
    if n and np.abs(t).max() >= _SAFE_NS:
        raise ValueError("time_ns out of range")
    if not 0 <= seq < 2**64:
        raise ValueError("seq must fit an unsigned 64-bit integer")
    strings = [s.encode() for s in (user, stream_id, source)]
    if not strings[0] or not strings[1] or len(stream_id) > MAX_STREAM_ID or any(len(s) > 0xFFFF for s in strings):
        raise ValueError("user and stream_id must be non-empty; stream_id at most 64 characters; strings < 64 KiB")

    time_enc, exp, time_bytes = TIME_ABSOLUTE, 0, t.astype("<i8").tobytes()
    if n >= 1:
        d = np.diff(t)
        # largest power-of-ten unit dividing every delta keeps int32 deltas lossless and in range
        for e in (9, 6, 3, 0):
            unit = 10**e
            if d.size and np.any(d % unit):
                continue
            q = d // unit
            if q.size == 0 or (q.min() >= _I32.min and q.max() <= _I32.max):
                time_enc, exp = TIME_DELTA32, e
                time_bytes = t[:1].astype("<i8").tobytes() + q.astype("<i4").tobytes()
                break
    value_enc, vexp, value_bytes = VALUE_F64, 0, v.astype("<f8").tobytes()
    # smallest lossless: int16 decimals (RR rounded to 0.1 ms, bpm, steps), float32 (BLE's 1/1024 s RR), float64
    big = n and float(np.abs(v).max()) > _I16.max
    for e in () if big else range(MAX_VALUE_EXP + 1):
        scale = 10.0**e
        q = np.rint(v * scale)
        if (not n or float(np.abs(q).max()) <= _I16.max) and np.array_equal(q / scale, v):
            value_enc, vexp, value_bytes = VALUE_I16, e, q.astype("<i2").tobytes()
            break
    else:
        with np.errstate(over="ignore"):  # a value beyond float32's range simply stays float64
            v32 = v.astype(np.float32)
        if np.array_equal(v32.astype(np.float64), v):
            value_enc, value_bytes = VALUE_F32, v32.astype("<f4").tobytes()
    header = _HEADER.pack(MAGIC, VERSION, time_enc, exp, value_enc, vexp, seq, n, *(len(s) for s in strings))
    return b"".join((header, *strings, time_bytes, m.astype(np.uint8).tobytes(), value_bytes))


def decode(payload: bytes, *, source: str = "ingest") -> WireBatch:
    """Decode a payload; anything malformed raises :class:`WireError` naming the field.

    ``source`` names where the bytes came from (the MQTT topic) in the error.
    """
    buf = bytes(payload)

    def bad(message: str, field: str, position: int | None = None) -> WireError:
        reason = {"n": "too_large", "time": "time_range", "value": "value_range"}.get(field, "malformed")
        return WireError(message, reason=reason, source=source, position=position, field=field)

    if len(buf) < HEADER_BYTES:
        raise bad(f"payload of {len(buf)} bytes is shorter than the {HEADER_BYTES}-byte header", "header")
    magic, version, time_enc, exp, value_enc, vexp, seq, n, lu, ls, lsrc = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise bad("not a binary ingest payload (magic FF 53 57 missing)", "magic", 0)
    if version != VERSION:
        raise bad(f"unsupported version {version} (this reader knows {VERSION})", "version", 3)
    if time_enc not in (TIME_ABSOLUTE, TIME_DELTA32):
        raise bad(f"unknown time encoding {time_enc}", "time_encoding", 4)
    if exp > 9 or (time_enc == TIME_ABSOLUTE and exp != 0):
        raise bad(f"time exponent {exp} out of range", "time_exp", 5)
    if value_enc not in (VALUE_F64, VALUE_F32, VALUE_I16):
        raise bad(f"unknown value encoding {value_enc}", "value_encoding", 6)
    if vexp > (MAX_VALUE_EXP if value_enc == VALUE_I16 else 0):
        raise bad(f"value exponent {vexp} out of range", "value_exp", 7)
    if n > MAX_SAMPLES:
        raise bad(f"{n} samples exceed the limit of {MAX_SAMPLES}", "n", 16)
    if lu == 0 or ls == 0 or ls > MAX_STREAM_ID * 4:
        raise bad("user and stream_id must be non-empty (stream_id at most 64 characters)", "user" if lu == 0 else "stream_id", 20)
    time_bytes = 8 * n if time_enc == TIME_ABSOLUTE else (8 + 4 * (n - 1) if n else 0)
    value_bytes = {VALUE_F64: 8, VALUE_F32: 4, VALUE_I16: 2}[value_enc] * n
    expected = HEADER_BYTES + lu + ls + lsrc + time_bytes + n + value_bytes
    if len(buf) != expected:
        raise bad(f"payload is {len(buf)} bytes; its header describes {expected}", "length")
    pos = HEADER_BYTES
    strings = []
    for name, length in (("user", lu), ("stream_id", ls), ("source", lsrc)):
        try:
            strings.append(buf[pos : pos + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise bad("not valid UTF-8", name, pos) from None
        pos += length
    user, stream_id, src = strings
    if len(stream_id) > MAX_STREAM_ID:
        raise bad("stream_id longer than 64 characters", "stream_id", HEADER_BYTES + lu)
    # Columns through the array module, not numpy: for the tens of samples of a live batch
    # numpy's per-call cost was 5x the whole decode (benchmarks/load/bench_wire.py).
    if time_enc == TIME_ABSOLUTE:
        t = _column("q", buf, pos, n)
    elif n == 0:
        t = []
    else:
        t0 = _column("q", buf, pos, 1)[0]
        d = _column("i", buf, pos + 8, n - 1)
        if exp:
            d = list(map(mul, d, repeat(10**exp, n - 1)))
        t = list(accumulate(d, initial=t0))
    if n and (min(t) <= -_SAFE_NS or max(t) >= _SAFE_NS):
        raise bad("times out of range", "time", pos)
    pos += time_bytes
    codes = list(buf[pos : pos + n])
    if n and max(codes) >= len(METRICS):
        raise bad(f"unknown metric code {max(codes)}", "metric", pos + next(k for k, c in enumerate(codes) if c >= len(METRICS)))
    pos += n
    if value_enc == VALUE_I16:
        v = list(map(truediv, _column("h", buf, pos, n), repeat(10.0**vexp, n)))
    else:
        v = _column("d" if value_enc == VALUE_F64 else "f", buf, pos, n)
        if not all(map(math.isfinite, v)):
            raise bad("values must be finite", "value", pos)
    return WireBatch(user, stream_id, int(seq), src, t, codes, v)


def identity(payload: bytes) -> tuple[str, str, int] | None:
    """``(user, stream_id, seq)`` of a binary payload from its header alone, without decoding
    the samples; None when the payload is not a well-formed binary batch (then decode it).
    For payloads the engine already took in once (its ingest log at a restart)."""
    if len(payload) < HEADER_BYTES:
        return None
    magic, version, _t, _e, _v, _x, seq, _n, lu, ls, _ls = _HEADER.unpack_from(payload)
    if magic != MAGIC or version != VERSION or lu == 0 or ls == 0 or len(payload) < HEADER_BYTES + lu + ls:
        return None
    try:
        user = bytes(payload[HEADER_BYTES : HEADER_BYTES + lu]).decode("utf-8")
        stream_id = bytes(payload[HEADER_BYTES + lu : HEADER_BYTES + lu + ls]).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user, stream_id, int(seq)


def _column(typecode: str, buf: bytes, pos: int, n: int) -> list:
    """``n`` little-endian numbers of ``typecode`` (array module) from ``buf`` at ``pos``."""
    col = array(typecode)
    col.frombytes(buf[pos : pos + n * col.itemsize])
    if _BIG_ENDIAN:
        col.byteswap()
    return col.tolist()
