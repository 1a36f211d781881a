"""Garmin FIT files (activities, HRM-Pro/Tri/Swim stored beats, all-day monitoring).

Decoder: ``fitdecode`` (0.11, maintained, MIT): it verifies header and file CRCs, follows
definition messages, compressed-timestamp headers, developer fields and chained FIT files,
and is several times faster than the pure-Python ``garmin-fit-sdk`` (which is also not in
the project's environment). We read *raw* field values and do the FIT-specific time
arithmetic ourselves, because two of the conversions we need are not right in the decoder
(fitdecode turns accumulated ``hr.event_timestamp`` values into wall-clock dates as if they
were FIT ``date_time`` values; they are beat times of the strap's own clock).

What becomes a sample (times are UTC; FIT time = seconds since 1989-12-31T00:00Z):

* ``record.heart_rate`` -> ``hr_bpm`` at the record's ``timestamp``.
* ``monitoring.heart_rate`` -> ``hr_bpm`` at ``timestamp``, or at ``timestamp_16``
  expanded against the last full timestamp: ``t = last + ((t16 - last) & 0xFFFF)``.
* ``hrv.time[]`` (s, scale 1000; ``0xFFFF`` = unused slot) -> ``rr_ms``. ``hrv`` messages
  carry no timestamp. Beats are laid end to end from an anchor: the anchor is the last
  timestamp seen before the first ``hrv`` message (the activity's first record), and
  each interval's sample time is the anchor plus the running sum of intervals (the beat
  that ends it). If a timestamped message shows that the beat clock has fallen more than
  :data:`HRV_REANCHOR_S` behind wall time, beats were not recorded (pause, strap off): the
  clock jumps forward to that timestamp, leaving a gap rather than shifting later beats
  into the past. On the real files (python-fitparse test set) the running sum stays
  within ~2 s of the record timestamps for the whole activity.
* ``hr`` messages (stored strap beats): ``event_timestamp`` (1/1024 s, strap clock) and
  the packed ``event_timestamp_12`` (8 x 12 bits, accumulated onto the last full value)
  are beat times; a message that has ``timestamp`` (+ ``fractional_timestamp``) and a full
  ``event_timestamp`` anchors strap time to UTC (as the FIT SDK's heart-rate merge does).
  Each beat gives ``hr_bpm`` from ``filtered_bpm`` and, from the previous beat, ``rr_ms``
  (beats more than :data:`~stresswatch.importing.RR_MAX_MS` apart start a new run).

Rejected (counted, not stored): invalid values (0xFF / 0xFFFF), implausible heart rates
and intervals, repeated or backwards beat times, beats before any anchor. A file that is
not FIT, truncated, fails its CRC or has an unsupported protocol version raises
:class:`~stresswatch.errors.ParseError` naming the file and byte offset.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import fitdecode
import numpy as np
import polars as pl

from stresswatch.errors import ParseError
from stresswatch.importing import RR_MAX_MS, ExportSource, InputFile, plausible, samples_frame

FIT_EPOCH_S = 631065600  # 1989-12-31T00:00:00Z in Unix seconds
HRV_REANCHOR_S = 5.0
_MAX_PROTOCOL_MAJOR = 2

_MSG_RECORD, _MSG_HRV, _MSG_HR, _MSG_MONITORING, _MSG_FILE_ID = 20, 78, 132, 55, 0
_F_TIMESTAMP = 253


@dataclass(frozen=True, slots=True)
class FitSeries:
    """What one FIT file holds for us: heart rates and RR intervals on the UTC time line."""

    hr_time_ns: np.ndarray
    hr_bpm: np.ndarray
    rr_time_ns: np.ndarray
    rr_ms: np.ndarray
    device: str
    rejected: tuple[tuple[str, int], ...]


def _native(msg: fitdecode.FitDataMessage) -> dict[int, object]:
    """Raw values of the fields the message itself carries (not expanded components)."""
    out: dict[int, object] = {}
    for f in msg.fields:
        fd = f.field_def
        if fd is None:  # an expanded component, or the compressed-header timestamp
            if f.def_num == _F_TIMESTAMP:
                out[_F_TIMESTAMP] = f.raw_value
        elif not fd.is_dev:  # developer fields reuse small numbers: never mistake them for profile fields
            out[f.def_num] = f.raw_value
    return out


def _unpack12(raw: object) -> list[int]:
    data = bytes(raw) if isinstance(raw, (tuple, list, bytes)) else b""
    n = int.from_bytes(data, "little")
    return [(n >> (12 * i)) & 0xFFF for i in range(len(data) * 8 // 12)]


def _as_tuple(raw: object) -> tuple:
    if raw is None:
        return ()
    return tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)


class _Builder:
    """Accumulates samples and rejections while walking the messages of one FIT stream."""

    def __init__(self) -> None:
        self.hr_t: list[float] = []
        self.hr_v: list[float] = []
        self.rr_t: list[float] = []
        self.rr_v: list[float] = []
        self.rejected: Counter[str] = Counter()
        self.device = "fit"
        self.reset()

    def reset(self) -> None:
        """A new FIT file in a chained stream: timestamps and anchors start over."""
        self.last_ts: int | None = None
        self.hrv_clock_s: float | None = None
        self.hr_anchor: tuple[float, int] | None = None  # (UTC s, strap time in 1/1024 s)
        self.hr_last_event: int | None = None
        self.hr_last_beat_s: float | None = None

    def file_id(self, f: dict[int, object], msg: fitdecode.FitDataMessage) -> None:
        manufacturer = msg.get_value("manufacturer", fallback=None)
        product = msg.get_value("product", fallback=None)
        parts = [str(p) for p in (manufacturer, product) if p is not None]
        if parts:
            self.device = "fit/" + "/".join(parts).replace(" ", "_")

    def timestamp(self, f: dict[int, object]) -> int | None:
        ts = f.get(_F_TIMESTAMP)
        if isinstance(ts, int) and ts != 0xFFFFFFFF:
            self.last_ts = ts
            return ts
        return None

    def record(self, f: dict[int, object]) -> None:
        ts = self.timestamp(f)
        if 3 not in f:
            return
        hr = f[3]
        if hr is None or hr == 0xFF:
            self.rejected["fit record: invalid heart rate (0xFF)"] += 1
        elif ts is None:
            self.rejected["fit record: heart rate without timestamp"] += 1
        else:
            self.hr_t.append(float(ts))
            self.hr_v.append(float(hr))  # type: ignore[arg-type]

    def monitoring(self, f: dict[int, object]) -> None:
        ts = self.timestamp(f)
        t16 = f.get(26)
        if ts is None and isinstance(t16, int) and self.last_ts is not None:
            ts = self.last_ts + ((t16 - self.last_ts) & 0xFFFF)
            self.last_ts = ts
        if 27 not in f:
            return
        hr = f[27]
        if hr is None or hr == 0xFF:
            self.rejected["fit monitoring: invalid heart rate (0xFF)"] += 1
        elif ts is None:
            self.rejected["fit monitoring: timestamp_16 before any full timestamp"] += 1
        else:
            self.hr_t.append(float(ts))
            self.hr_v.append(float(hr))  # type: ignore[arg-type]

    def hrv(self, f: dict[int, object]) -> None:
        times = [t for t in _as_tuple(f.get(0)) if t is not None and t != 0xFFFF]
        if not times:
            return
        if self.hrv_clock_s is None:
            if self.last_ts is None:
                self.rejected["fit hrv: RR before any timestamp"] += len(times)
                return
            self.hrv_clock_s = float(self.last_ts)
        elif self.last_ts is not None and self.last_ts - self.hrv_clock_s > HRV_REANCHOR_S:
            self.hrv_clock_s = float(self.last_ts)  # beats were not recorded: a gap, not a shift
        for t in times:
            rr_s = t / 1000.0  # type: ignore[operator]
            self.hrv_clock_s += rr_s
            self.rr_t.append(self.hrv_clock_s)
            self.rr_v.append(rr_s * 1000.0)

    def hr(self, f: dict[int, object]) -> None:
        ts = self.timestamp(f)
        bpms = _as_tuple(f.get(6))
        full = [e for e in _as_tuple(f.get(9)) if e is not None and e != 0xFFFFFFFF]
        if 10 in f and f[10] is not None:
            if self.hr_last_event is None:
                self.rejected["fit hr: packed beat times before a full event_timestamp"] += len(bpms) or 1
                return
            events = []
            last = self.hr_last_event
            for v in _unpack12(f[10]):
                last = last + ((v - last) & 0xFFF)
                events.append(last)
        else:
            events = [int(e) for e in full]  # type: ignore[call-overload]
        if ts is not None and full:
            frac = f.get(0)
            frac_s = frac / 32768.0 if isinstance(frac, int) and frac != 0xFFFF else 0.0
            self.hr_anchor = (ts + frac_s, int(full[0]))  # type: ignore[call-overload]
        if not events:
            return
        if self.hr_anchor is None:
            self.rejected["fit hr: beats before any timestamp anchor"] += len(events)
            self.hr_last_event = events[-1]
            return
        anchor_s, anchor_ev = self.hr_anchor
        for i, ev in enumerate(events):
            bpm = bpms[i] if i < len(bpms) else None
            if self.hr_last_event is not None and ev <= self.hr_last_event and self.hr_last_beat_s is not None:
                self.rejected["fit hr: repeated or backwards beat time"] += 1
                continue
            beat_s = anchor_s + (ev - anchor_ev) / 1024.0
            if bpm is not None and bpm != 0xFF:
                self.hr_t.append(beat_s)
                self.hr_v.append(float(bpm))
            if self.hr_last_beat_s is not None:
                rr_ms = (beat_s - self.hr_last_beat_s) * 1000.0
                if 0 < rr_ms <= RR_MAX_MS:
                    self.rr_t.append(beat_s)
                    self.rr_v.append(rr_ms)
            self.hr_last_beat_s = beat_s
            self.hr_last_event = ev
        self.hr_last_event = events[-1] if self.hr_last_event is None else max(self.hr_last_event, events[-1])

    def series(self) -> FitSeries:
        def ns(seconds: list[float]) -> np.ndarray:
            # FIT time -> Unix ns; rounding to the microsecond keeps 1/1024 s beats exact enough
            return np.round((np.asarray(seconds, dtype=np.float64) + FIT_EPOCH_S) * 1e6).astype(np.int64) * 1000

        return FitSeries(
            hr_time_ns=ns(self.hr_t),
            hr_bpm=np.asarray(self.hr_v, dtype=np.float64),
            rr_time_ns=ns(self.rr_t),
            rr_ms=np.round(np.asarray(self.rr_v, dtype=np.float64), 3),
            device=self.device,
            rejected=tuple(sorted(self.rejected.items())),
        )


def _check_header(data: bytes, source: str) -> None:
    if len(data) < 12:
        raise ParseError(f"too short for a FIT file ({len(data)} bytes)", source=source, position="byte 0")
    if data[8:12] != b".FIT":
        raise ParseError("not a FIT file (no '.FIT' signature in the header)", source=source, position="byte 8")
    major = data[1] >> 4
    if major > _MAX_PROTOCOL_MAJOR:
        raise ParseError(
            f"unsupported FIT protocol version {major}.{data[1] & 0x0F} (this reader knows up to {_MAX_PROTOCOL_MAJOR}.x)",
            source=source,
            position="byte 1",
        )


def decode_fit(data: bytes, *, source: str = "fit") -> FitSeries:
    """Decode one FIT byte string (possibly several chained FIT files). Pure: no I/O.

    Raises :class:`ParseError` (only) for anything that is not a complete, valid FIT file.
    """
    _check_header(data, source)
    b = _Builder()
    reader = fitdecode.FitReader(
        io.BytesIO(data),
        processor=fitdecode.DataProcessorBase(),
        check_crc=fitdecode.CrcCheck.RAISE,
        error_handling=fitdecode.ErrorHandling.RAISE,
    )
    handlers = {_MSG_RECORD: b.record, _MSG_HRV: b.hrv, _MSG_HR: b.hr, _MSG_MONITORING: b.monitoring}
    try:
        with reader:
            for frame in reader:
                if isinstance(frame, fitdecode.FitHeader):
                    if frame.proto_ver is not None and frame.proto_ver[0] > _MAX_PROTOCOL_MAJOR:
                        raise ParseError(f"unsupported FIT protocol version {frame.proto_ver}", source=source)
                    b.reset()
                    continue
                if not isinstance(frame, fitdecode.FitDataMessage):
                    continue
                num = frame.global_mesg_num
                handler = handlers.get(num)
                if handler is not None:
                    handler(_native(frame))
                elif num == _MSG_FILE_ID:
                    b.file_id(_native(frame), frame)
                else:
                    b.timestamp(_native(frame))
    except ParseError:
        raise
    except fitdecode.FitEOFError as exc:
        raise ParseError(f"truncated FIT file: {exc}", source=source, position=f"byte {exc.offset}") from None
    except fitdecode.FitError as exc:
        offset = getattr(exc, "offset", None)
        raise ParseError(
            f"corrupt FIT file: {str(exc) or type(exc).__name__}",
            source=source,
            position=f"byte {offset}" if offset is not None else None,
        ) from None
    except (
        struct.error, IndexError, KeyError, ValueError, TypeError, OverflowError, EOFError, UnicodeDecodeError, AssertionError
    ) as exc:
        # fitdecode trusts the definition messages it reads (and asserts on some orderings,
        # e.g. packed hr beat times before any hr timestamp); corrupt input surfaces as these.
        raise ParseError(f"corrupt FIT file: {type(exc).__name__}: {exc}", source=source) from None
    return b.series()


class FitSource(ExportSource):
    """``stresswatch import fit PATH``: one .fit file, a folder of them, or a zip of them."""

    kind: ClassVar[str] = "fit"
    suffixes: ClassVar[tuple[str, ...]] = (".fit",)
    what: ClassVar[str] = "FIT files (*.fit)"

    def parse(self, inp: InputFile) -> Iterator[pl.DataFrame]:
        series = decode_fit(inp.read_bytes(), source=inp.name)
        for reason, n in series.rejected:
            self.report.reject(reason, n)
        n_hr, n_rr = len(series.hr_bpm), len(series.rr_ms)
        self.report.read += n_hr + n_rr + sum(n for _, n in series.rejected)
        frame = pl.concat(
            [
                samples_frame(self.user, series.hr_time_ns, "hr_bpm", series.hr_bpm, series.device),
                samples_frame(self.user, series.rr_time_ns, "rr_ms", series.rr_ms, series.device),
            ]
        ).sort("time", maintain_order=True)
        yield plausible(frame, self.report, label="fit")
