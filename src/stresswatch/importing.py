"""The import seam: what every vendor-export adapter shares with ``stresswatch import``.

An import adapter is a :class:`~stresswatch.sources.Source` (registered under the
``stresswatch.sources`` entry-point group) built on :class:`ExportSource`. It

* accepts one file, the unpacked export folder, or the export's zip (:func:`find_inputs`);
* yields samples frames in bounded chunks, each sorted by time;
* counts what it read and what it rejected, per reason, in :attr:`ExportSource.report`
  (a row that is malformed on its own is rejected and counted; a file that is not the
  format at all, truncated or corrupt raises :class:`~stresswatch.errors.ParseError`
  naming the file and position, and the import stores nothing).

The core (the ``import`` command) only uses this module and the registry; it never
imports an adapter by name.
"""

from __future__ import annotations

import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import polars as pl

from .errors import ParseError
from .model import SAMPLES_SCHEMA, TIME

HR_MIN_BPM = 20.0
HR_MAX_BPM = 250.0
RR_MIN_MS = 200.0  # 300 bpm: nothing faster is a heartbeat
RR_MAX_MS = 3000.0  # 20 bpm: anything longer spans a gap, not one interval


@dataclass
class ImportReport:
    """Rows read, kept and rejected (per reason, and per metric where the adapter knows it)
    by one import, plus progress in bytes."""

    read: int = 0
    kept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    bytes_total: int = 0
    bytes_done: int = 0
    files: list[str] = field(default_factory=list)
    kept_by_metric: Counter[str] = field(default_factory=Counter)
    rejected_by_metric: Counter[str] = field(default_factory=Counter)

    def reject(self, reason: str, n: int = 1, *, metric: str | None = None) -> None:
        """Count ``n`` rows rejected for ``reason``; ``metric`` when the rows had a known one."""
        if n:
            self.rejected[reason] += n
            if metric is not None:
                self.rejected_by_metric[metric] += n

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


@dataclass(frozen=True)
class InputFile:
    """One file to parse: on disk or inside a zip. ``name`` is what errors show."""

    name: str
    size: int
    _open: Callable[[], IO[bytes]]

    def open(self) -> IO[bytes]:
        try:
            return self._open()
        except (OSError, zipfile.BadZipFile, RuntimeError, ValueError) as exc:
            raise ParseError(f"cannot open: {exc}", source=self.name) from None

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            try:
                return fh.read()
            except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error) as exc:
                raise ParseError(f"cannot read: {exc}", source=self.name) from None


def _zip_members(path: Path, accept: Callable[[str], bool]) -> list[InputFile]:
    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ParseError(f"not a readable zip: {exc}", source=path) from None
    out = []
    for info in infos:
        if info.is_dir() or not accept(info.filename):
            continue
        out.append(InputFile(f"{path}:{info.filename}", info.file_size, lambda i=info: zf.open(i)))
    return out


def find_inputs(path: Path | str, accept: Callable[[str], bool], *, what: str) -> list[InputFile]:
    """The files an export adapter reads under ``path`` (a file, a folder, or a zip).

    ``accept`` gets a member's name (relative path with ``/``) and says whether this adapter
    reads it. A single file given explicitly is always read (the user named it); a folder or
    zip is searched recursively. Sorted by name so imports are reproducible.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and accept(p.relative_to(path).as_posix()))
        found = [InputFile(str(p), p.stat().st_size, lambda p=p: open(p, "rb")) for p in files]  # noqa: SIM115
        for z in sorted(path.rglob("*.zip")):
            found.extend(_zip_members(z, accept))
    elif path.is_file():
        if path.suffix.lower() == ".zip":
            found = _zip_members(path, accept)
        else:
            return [InputFile(str(path), path.stat().st_size, lambda: open(path, "rb"))]  # noqa: SIM115
    else:
        raise ParseError("no such file or folder", source=path)
    if not found:
        raise ParseError(f"no {what} found in it", source=path)
    return sorted(found, key=lambda f: f.name)


def samples_frame(
    user: str, time_ns: np.ndarray | list[int], metric: str, value: np.ndarray | list[float], source: str
) -> pl.DataFrame:
    """A samples frame from parallel arrays (one metric, one source), sorted by time."""
    t = pl.Series("time", np.asarray(time_ns, dtype=np.int64)).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC")
    n = len(t)
    return pl.DataFrame(
        {
            "user": pl.repeat(user, n, dtype=pl.String, eager=True),
            "time": t.cast(TIME),
            "metric": pl.repeat(metric, n, dtype=pl.String, eager=True),
            "value": pl.Series(np.asarray(value, dtype=np.float64)),
            "source": pl.repeat(source, n, dtype=pl.String, eager=True),
        },
        schema=SAMPLES_SCHEMA,
    ).sort("time", maintain_order=True)


def plausible(frame: pl.DataFrame, report: ImportReport, *, label: str) -> pl.DataFrame:
    """Drop (and count) heart rates and RR intervals no heart produces, and non-finite values."""
    hr = pl.col("metric") == "hr_bpm"
    rr = pl.col("metric") == "rr_ms"
    finite = pl.col("value").is_finite()
    bad_hr = hr & (~finite | (pl.col("value") < HR_MIN_BPM) | (pl.col("value") > HR_MAX_BPM))
    bad_rr = rr & (~finite | (pl.col("value") < RR_MIN_MS) | (pl.col("value") > RR_MAX_MS))
    counts = frame.select(bad_hr.sum().alias("hr"), bad_rr.sum().alias("rr")).row(0)
    report.reject(f"{label}: heart rate outside {HR_MIN_BPM:g}-{HR_MAX_BPM:g} bpm", int(counts[0]), metric="hr_bpm")
    report.reject(f"{label}: RR interval outside {RR_MIN_MS:g}-{RR_MAX_MS:g} ms", int(counts[1]), metric="rr_ms")
    if counts[0] or counts[1]:
        frame = frame.filter(~(bad_hr | bad_rr))
    return frame


class ExportSource:
    """Base of the export adapters: inputs, chunked parsing, the report, the Source protocol.

    Subclasses set ``kind``, ``suffixes``, ``what`` (for messages), implement
    :meth:`accept` (which member names they read) and :meth:`parse` (one input -> frames).
    Options not used by an adapter are ignored, so one command line serves all kinds.
    """

    kind: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    what: ClassVar[str] = "files"

    def __init__(self, path: Path | str, *, user: str | None = None, **options: Any) -> None:
        self.path = Path(path)
        self.user = user or self.path.stem
        self.options = options
        self.report = ImportReport()

    @classmethod
    def accept(cls, name: str) -> bool:
        return any(name.lower().endswith(s) for s in cls.suffixes)

    def inputs(self) -> list[InputFile]:
        return find_inputs(self.path, self.accept, what=self.what)

    def parse(self, inp: InputFile) -> Iterator[pl.DataFrame]:
        raise NotImplementedError

    def batches(self) -> Iterator[pl.DataFrame]:
        """Every chunk of every input, in input order; updates :attr:`report` as it goes."""
        inputs = self.inputs()
        self.report.bytes_total = sum(i.size for i in inputs)
        done = 0
        for inp in inputs:
            self.report.files.append(inp.name)
            for frame in self.parse(inp):
                self.report.kept += frame.height
                if frame.height:
                    self.report.kept_by_metric.update(dict(frame.get_column("metric").value_counts().iter_rows()))
                    yield frame
            done += inp.size
            self.report.bytes_done = done

    async def __aiter__(self) -> AsyncIterator[pl.DataFrame]:
        for frame in self.batches():
            yield frame


def parse_start_time(text: str, tz: str | None = None) -> datetime:
    """``--start-time``: an ISO 8601 date and time; without an offset it is in ``tz`` (default UTC)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ParseError(f"{text!r} is not an ISO 8601 date and time (e.g. 2026-11-20T09:30:00+01:00)", source="--start-time") from None
    if t.tzinfo is None:
        try:
            t = t.replace(tzinfo=ZoneInfo(tz or "UTC"))
        except (ZoneInfoNotFoundError, ValueError):
            raise ParseError(f"unknown time zone {tz!r}", source="--tz") from None
    return t.astimezone(timezone.utc)


def input_fingerprints(source: object, path: Path) -> dict[str, str]:
    """SHA-256 of every file an import reads -> its display name, so the same file imported
    again (alone, in its folder or in its zip, under another name) is recognised."""
    import hashlib

    inputs = source.inputs() if isinstance(source, ExportSource) else None
    if inputs is None:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        inputs = [InputFile(str(p), p.stat().st_size, lambda p=p: open(p, "rb")) for p in files]  # noqa: SIM115
    out: dict[str, str] = {}
    for inp in inputs:
        h = hashlib.sha256()
        with inp.open() as fh:
            try:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error) as exc:
                raise ParseError(f"cannot read: {exc}", source=inp.name) from None
        out.setdefault(h.hexdigest(), inp.name)
    return out

