"""Apple Health export: ``export.xml``, the unpacked ``apple_health_export/`` folder, or ``export.zip``.

Exports reach several GB, so the file is streamed through expat (the C parser behind
``xml.etree``) with start/end handlers only: no element tree is built, nothing is kept
but the values we want, and they are handed on in chunks of :data:`CHUNK_ROWS`. Memory is
bounded by the chunk size, not the file size (see ``benchmarks/bench_import.py``).

Read:

* ``Record type="HKQuantityTypeIdentifierHeartRate"`` (``unit="count/min"``) ->
  ``hr_bpm`` at ``startDate`` (``2022-12-01 08:00:02 +0100``).
* ``Record type="HKQuantityTypeIdentifierHeartRateVariabilitySDNN"`` ->
  its ``HeartRateVariabilityMetadataList/InstantaneousBeatsPerMinute`` beat list: each
  beat's ``time`` is a *locale-formatted time of day* ("6:14:48.94 PM", with a space, a
  no-break space or a narrow no-break space U+202F before AM/PM; "18:14:48,94"; "午後6:14:48.94").
  The date and UTC offset come from the record's ``startDate``; the day is the one that
  puts the beat nearest the record start (a record that crosses midnight). Each interval
  between successive beats of one record becomes ``rr_ms`` at the later beat. The SDNN
  value itself is a summary, not a sample, and is not stored.

Every other record type is skipped (not counted: an export holds dozens of types).
Rejected and counted: heart rates whose unit is not count/min or value not a number,
dates that do not parse, beat times that do not parse, intervals outside plausible
bounds (a gap in the beat list). Malformed XML, a truncated file, or a root element other
than ``HealthData`` raise :class:`~stresswatch.errors.ParseError` naming line and column.

The ``source`` column is ``apple_health/<hardware>`` (e.g. ``apple_health/Watch6,1``),
taken from the record's ``device``; never ``sourceName``, which is often a person's name.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar
from xml.parsers import expat

import polars as pl

from stresswatch.errors import ParseError
from stresswatch.importing import ExportSource, InputFile, plausible, samples_frame
from stresswatch.model import SAMPLES_SCHEMA

HR_TYPE = "HKQuantityTypeIdentifierHeartRate"
SDNN_TYPE = "HKQuantityTypeIdentifierHeartRateVariabilitySDNN"
CHUNK_ROWS = 100_000
READ_BYTES = 1 << 20

_HARDWARE = re.compile(r"hardware:(.+?)(?:, \w+:|>)")
_TIME_OF_DAY = re.compile(
    r"^(?P<pre>午前|午後|上午|下午|오전|오후)?\s*(?P<h>\d{1,2})[:.](?P<m>\d{2})[:.](?P<s>\d{2})(?:[.,](?P<f>\d{1,6}))?"
    r"\s*(?P<post>[AaPp]\.?\s?[Mm]\.?)?$"
)
_PM_PREFIX = {"午後", "下午", "오후"}


def parse_time_of_day(text: str) -> float | None:
    """Seconds since midnight of a locale-formatted time of day, or None if it does not parse."""
    m = _TIME_OF_DAY.match(text.replace("\u202f", " ").replace("\xa0", " ").strip())
    if m is None:
        return None
    h, mi, s = int(m["h"]), int(m["m"]), int(m["s"])
    marker = m["post"] or m["pre"]
    if marker is not None:
        if not 1 <= h <= 12:
            return None
        pm = (m["pre"] in _PM_PREFIX) if m["pre"] else m["post"][0] in "Pp"
        h = h % 12 + (12 if pm else 0)
    if h > 23 or mi > 59 or s > 60:
        return None
    frac = float("0." + m["f"]) if m["f"] else 0.0
    return h * 3600 + mi * 60 + s + frac


_START_FORMAT = "%Y-%m-%d %H:%M:%S %z"


def beat_times_ns(start_date: str, times: list[str]) -> list[int | None]:
    """UTC ns of each beat of one SDNN record (None where a time does not parse)."""
    try:
        start = datetime.strptime(start_date, _START_FORMAT)
    except ValueError:
        return [None] * len(times)
    midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
    out: list[int | None] = []
    for text in times:
        tod = parse_time_of_day(text)
        if tod is None:
            out.append(None)
            continue
        beat = midnight + timedelta(seconds=tod)
        # the day that puts the beat nearest the record's start (records cross midnight)
        beat = min((beat - timedelta(days=1), beat, beat + timedelta(days=1)), key=lambda b: abs(b - start))
        out.append(round(beat.timestamp() * 1e6) * 1000)
    return out


_DAY_NS = 86_400 * 10**9
# The same grammar as _TIME_OF_DAY, for polars (Rust regex); [0-9] so both agree on digits.
_TOD_POLARS = (
    r"^(?P<pre>午前|午後|上午|下午|오전|오후)?\s*(?P<h>[0-9]{1,2})[:.](?P<m>[0-9]{2})[:.](?P<s>[0-9]{2})(?:[.,](?P<f>[0-9]{1,6}))?"
    r"\s*(?P<post>[AaPp]\.?\s?[Mm]\.?)?$"
)


def _rr_from_beats(chunk: AppleChunk, user: str, rejected: Counter[str]) -> pl.DataFrame:
    """Vectorised :func:`beat_times_ns` + successive differences for every beat of a chunk."""
    if not chunk.beat_text:
        return samples_frame(user, [], "rr_ms", [], "apple_health")
    rec = pl.DataFrame({"start": chunk.sdnn_start, "source": chunk.sdnn_source}, schema={"start": pl.String, "source": pl.String})
    rec = rec.with_columns(
        start_ns=pl.col("start").str.to_datetime(_START_FORMAT, time_unit="ns", strict=False).dt.epoch("ns"),
        offset_ns=pl.col("start").str.extract(r"([+-][0-9]{2})[0-9]{2}$").cast(pl.Int64, strict=False) * 3600 * 10**9
        + pl.col("start").str.extract(r"([+-])[0-9]{2}([0-9]{2})$", 2).cast(pl.Int64, strict=False)
        * 60
        * 10**9
        * pl.when(pl.col("start").str.extract(r"([+-])[0-9]{4}$") == "-").then(-1).otherwise(1),
    ).with_row_index("rec")
    g = (
        pl.DataFrame({"text": chunk.beat_text, "rec": chunk.beat_record}, schema={"text": pl.String, "rec": pl.UInt32})
        .with_columns(pl.col("text").str.replace_all("[\u202f\u00a0]", " ").str.strip_chars().str.extract_groups(_TOD_POLARS).alias("g"))
        .unnest("g")
        .join(rec, on="rec", how="left", maintain_order="left")
    )
    h = pl.col("h").cast(pl.Int64, strict=False)
    m = pl.col("m").cast(pl.Int64, strict=False)
    sec = pl.col("s").cast(pl.Int64, strict=False)
    marker = pl.col("post").is_not_null() | pl.col("pre").is_not_null()
    pm = pl.col("pre").is_in(sorted(_PM_PREFIX)) | pl.col("post").str.starts_with("P") | pl.col("post").str.starts_with("p")
    hour = pl.when(marker).then(h % 12 + pl.when(pm.fill_null(False)).then(12).otherwise(0)).otherwise(h)
    ok = h.is_not_null() & (~marker | ((h >= 1) & (h <= 12))) & (h <= 23) & (m <= 59) & (sec <= 60)
    frac_ns = pl.col("f").fill_null("0").str.pad_end(9, "0").cast(pl.Int64, strict=False)
    tod_ns = (hour * 3600 + m * 60 + sec) * 10**9 + frac_ns
    local_start = pl.col("start_ns") + pl.col("offset_ns")
    beat_local = (local_start // _DAY_NS) * _DAY_NS + tod_ns
    # the day that puts the beat nearest the record's start (records cross midnight)
    k = ((local_start - beat_local) / _DAY_NS).round(0).clip(-1, 1).cast(pl.Int64)
    beats = g.with_columns(
        t=pl.when(ok & pl.col("start_ns").is_not_null() & pl.col("offset_ns").is_not_null())
        .then(beat_local + k * _DAY_NS - pl.col("offset_ns"))
        .otherwise(None)
    )
    # microseconds, as the scalar path rounds
    beats = beats.with_columns(t=(pl.col("t") / 1000).round(0).cast(pl.Int64) * 1000)
    bad = int(beats.get_column("t").null_count())
    if bad:
        rejected["apple_health beat: time of day or record startDate does not parse"] += bad
        beats = beats.filter(pl.col("t").is_not_null())
    # ms to the microsecond (beat times are whole microseconds; polars divides by multiplying)
    rr = beats.with_columns(rr=((pl.col("t") - pl.col("t").shift(1).over("rec")) / 1e6).round(3)).filter(pl.col("rr").is_not_null())
    n = rr.height
    return pl.DataFrame(
        {
            "user": pl.repeat(user, n, dtype=pl.String, eager=True),
            "time": rr.get_column("t").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
            "metric": pl.repeat("rr_ms", n, dtype=pl.String, eager=True),
            "value": rr.get_column("rr").cast(pl.Float64),
            "source": rr.get_column("source"),
        },
        schema=SAMPLES_SCHEMA,
    )


@dataclass
class AppleChunk:
    """Raw values collected since the last :meth:`AppleHealthParser.take`."""

    hr_date: list[str] = field(default_factory=list)
    hr_value: list[str] = field(default_factory=list)
    hr_source: list[str] = field(default_factory=list)
    beat_text: list[str] = field(default_factory=list)  # time-of-day strings, all records
    beat_record: list[int] = field(default_factory=list)  # index into sdnn_start / sdnn_source
    sdnn_start: list[str] = field(default_factory=list)
    sdnn_source: list[str] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def rows(self) -> int:
        """Heart rates plus beats: a bound on the rows this chunk turns into."""
        return len(self.hr_date) + len(self.beat_text)


class AppleHealthParser:
    """Push parser: :meth:`feed` bytes, :meth:`take` what was collected, :meth:`close` at the end.

    Pure (no I/O); raises only :class:`ParseError`.
    """

    def __init__(self, *, source: str = "export.xml") -> None:
        self.source = source
        self._p = expat.ParserCreate()
        self._p.buffer_text = False
        self._p.StartElementHandler = self._start
        self._p.EndElementHandler = None  # set only inside an SDNN record: most elements need no end call
        self._chunk = AppleChunk()
        self._devices: dict[str, str] = {}
        self._root_seen = False
        self._sdnn_start: str | None = None
        self._sdnn_source = ""
        self._beats: list[str] = []

    def _device(self, attrs: dict[str, str]) -> str:
        dev = attrs.get("device")
        if not dev:
            return "apple_health"
        src = self._devices.get(dev)
        if src is None:
            m = _HARDWARE.search(dev)
            src = f"apple_health/{m.group(1).strip()}" if m else "apple_health"
            if len(self._devices) < 10_000:  # bounded: a pathological file must not grow this forever
                self._devices[dev] = src
        return src

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if not self._root_seen:
            self._root_seen = True
            if name != "HealthData":
                raise ParseError(f"not an Apple Health export (root element <{name}>, expected <HealthData>)", source=self.source, position="line 1")
            return
        if name == "Record":
            kind = attrs.get("type")
            if kind == HR_TYPE:
                c = self._chunk
                if attrs.get("unit", "count/min") != "count/min":
                    c.rejected[f"apple_health heart rate: unit {attrs.get('unit')!r} is not count/min"] += 1
                    return
                c.hr_date.append(attrs.get("startDate", ""))
                c.hr_value.append(attrs.get("value", ""))
                c.hr_source.append(self._device(attrs))
            elif kind == SDNN_TYPE:
                self._sdnn_start = attrs.get("startDate", "")
                self._sdnn_source = self._device(attrs)
                self._beats = []
                self._p.EndElementHandler = self._end
        elif name == "InstantaneousBeatsPerMinute" and self._sdnn_start is not None:
            self._beats.append(attrs.get("time", ""))

    def _end(self, name: str) -> None:
        if name == "Record" and self._sdnn_start is not None:
            self._flush_beats()

    def _flush_beats(self) -> None:
        c = self._chunk
        if self._beats:
            rec = len(c.sdnn_start)
            c.sdnn_start.append(self._sdnn_start or "")
            c.sdnn_source.append(self._sdnn_source)
            c.beat_text.extend(self._beats)
            c.beat_record.extend([rec] * len(self._beats))
        self._sdnn_start = None
        self._beats = []
        self._p.EndElementHandler = None

    def _raise(self, exc: expat.ExpatError) -> None:
        raise ParseError(
            f"malformed XML: {expat.ErrorString(exc.code)}",
            source=self.source,
            position=f"line {exc.lineno}, column {exc.offset + 1}",
        ) from None

    def _encoding_error(self, exc: Exception) -> None:
        # expat asks Python's codecs for an encoding named in the XML declaration
        raise ParseError(
            f"unsupported text encoding: {exc}", source=self.source, position=f"line {self._p.CurrentLineNumber}"
        ) from None

    def feed(self, data: bytes) -> None:
        try:
            self._p.Parse(data, False)
        except expat.ExpatError as exc:
            self._raise(exc)
        except (LookupError, UnicodeError) as exc:
            self._encoding_error(exc)

    def close(self) -> None:
        try:
            self._p.Parse(b"", True)
        except expat.ExpatError as exc:
            self._raise(exc)
        except (LookupError, UnicodeError) as exc:
            self._encoding_error(exc)
        if not self._root_seen:
            raise ParseError("empty file: no XML elements", source=self.source, position="line 1")

    @property
    def pending_rows(self) -> int:
        return self._chunk.rows

    def take(self) -> AppleChunk:
        chunk, self._chunk = self._chunk, AppleChunk()
        return chunk


def chunk_to_frame(chunk: AppleChunk, user: str) -> tuple[pl.DataFrame, Counter[str]]:
    """Vectorised conversion of one chunk: parse dates and values, build samples, count rejects."""
    rejected = Counter(chunk.rejected)
    n = len(chunk.hr_date)
    hr = pl.DataFrame(
        {
            "user": pl.repeat(user, n, dtype=pl.String, eager=True),
            "time": pl.Series(chunk.hr_date, dtype=pl.String)
            .str.to_datetime(_START_FORMAT, time_unit="ns", strict=False)
            .dt.convert_time_zone("UTC"),
            "metric": pl.repeat("hr_bpm", n, dtype=pl.String, eager=True),
            "value": pl.Series(chunk.hr_value, dtype=pl.String).cast(pl.Float64, strict=False),
            "source": pl.Series(chunk.hr_source, dtype=pl.String),
        },
        schema=SAMPLES_SCHEMA,
    )
    for reason, bad in (
        ("apple_health heart rate: startDate does not parse", pl.col("time").is_null()),
        ("apple_health heart rate: value is not a number", pl.col("value").is_null()),
    ):
        k = int(hr.select(bad.sum()).item())
        if k:
            rejected[reason] += k
            hr = hr.filter(~bad)
    rr = _rr_from_beats(chunk, user, rejected)
    return pl.concat([hr, rr]), rejected


class AppleHealthSource(ExportSource):
    """``stresswatch import apple_health PATH``: export.xml, the export folder, or export.zip."""

    kind: ClassVar[str] = "apple_health"
    suffixes: ClassVar[tuple[str, ...]] = (".xml",)
    what: ClassVar[str] = "Apple Health export.xml"

    @classmethod
    def accept(cls, name: str) -> bool:
        return name.rsplit("/", 1)[-1] == "export.xml"

    def _emit(self, chunk: AppleChunk) -> pl.DataFrame:
        frame, rejected = chunk_to_frame(chunk, self.user)
        self.report.read += frame.height + sum(rejected.values())
        self.report.rejected.update(rejected)
        return plausible(frame, self.report, label="apple_health").sort("time", maintain_order=True)

    def parse(self, inp: InputFile) -> Iterator[pl.DataFrame]:
        parser = AppleHealthParser(source=inp.name)
        base = self.report.bytes_done
        done = 0
        with inp.open() as fh:
            while True:
                try:
                    block = fh.read(READ_BYTES)
                except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:  # a corrupt zip member
                    raise ParseError(f"cannot read: {exc}", source=inp.name, position=f"byte {done}") from None
                if not block:
                    break
                parser.feed(block)
                done += len(block)
                self.report.bytes_done = base + done
                if parser.pending_rows >= CHUNK_ROWS:
                    yield self._emit(parser.take())
        parser.close()
        yield self._emit(parser.take())
