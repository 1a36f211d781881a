"""What a researcher replays, read and made deterministic: files planned by user (Parquet
without reading), read in blocks of users through the source registry, cleaned (exact
duplicates dropped, conflicting duplicates resolved by input order, each counted in the
:class:`InputReport`), and cut into hourly batches of data time; and labelled episodes.
:mod:`stresswatch.replay` runs what this reads through the pipeline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl

from .errors import ParseError
from .model import METRICS, SAMPLES_SCHEMA, empty_samples, validate_samples
from .sources import SourceRegistry, collect

T = TypeVar("T")
BATCH_S = 3600  # one hour of data time per batch, as a companion would send it


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also inside a notebook's running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# -- input ---------------------------------------------------------------------------------


@dataclass
class InputReport:
    """What was read and what was dropped, and why. Never a silent change of results."""

    files: list[dict[str, Any]] = field(default_factory=list)  # name, kind-less sha256, rows
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "notes": sorted(set(self.notes)),
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


NS = 1_000_000_000
DAY_NS = 86400 * NS
# one user's samples at one time go in metric-name order (as a sort by user, metric, time put them)
METRIC_NAMES = tuple(sorted(METRICS))


def _codes(col: pl.Series, names: Sequence[str]) -> np.ndarray:
    """Index of each row's string in ``names`` (every string must be one of them)."""
    if len(names) == 1:
        return np.zeros(col.len(), np.uint32)
    if len(names) <= 8:  # a few comparisons beat hashing every row
        expr = sum(((pl.col(col.name) == name).cast(pl.UInt32) * i for i, name in enumerate(names) if i), pl.lit(0, pl.UInt32))
        return col.to_frame().select(expr).to_series().to_numpy()
    return col.cast(pl.Enum(list(names))).to_physical().cast(pl.UInt32).to_numpy()


@dataclass(frozen=True)
class _Part:
    """One part of a block being cleaned: its frame and time-ordered codes."""

    frame: pl.DataFrame
    u: np.ndarray
    t: np.ndarray
    m: np.ndarray
    pos: np.ndarray | None  # input row of each time-ordered row (None: the same)


class SampleBlock:
    """The samples of users that no other block has, cleaned as they are taken, one UTC day of
    data at a time: exact duplicates and conflicting duplicates (same user, metric, time; the
    first in input order wins) dropped and counted in the report; each day's rows ordered by
    user, time, and one user's samples at one time by metric name. Feeding the days in order
    is the same as feeding the block's samples ordered by user, metric, time cut into days
    (the detector then takes them without sorting).

    Vectorised and a day at a time (arrays of one day stay in cache): a stable radix sort by
    user of each day's time-ordered rows; only rows sharing a user and a time with another are
    looked at more closely (as a small frame). Only one part is held at a time."""

    def __init__(
        self,
        samples: pl.DataFrame | Iterable[pl.DataFrame],
        report: InputReport | None = None,
        *,
        users: Sequence[str] | None = None,
        note_unsorted: bool = True,
        keep_source: bool = False,
    ) -> None:
        """``samples``: validated samples: one frame, or parts in time order that each hold
        whole UTC days (a time-ordered file read in parts; ``users`` is then needed).
        ``users``: every user of the samples, if known. ``note_unsorted``: say in the report
        when a frame was not in time order (off for a reader that sorted files by time
        before). ``keep_source``: keep the ``source`` column (:meth:`to_frame`); batches for
        the detector leave it empty."""
        self.report = report if report is not None else InputReport()
        if isinstance(samples, pl.DataFrame):
            users = users if users is not None else samples.get_column("user").unique().drop_nulls().to_list()
            samples = [samples]
        elif users is None:
            raise ValueError("a block read in parts needs its users")
        self.users = tuple(sorted(users))
        self._parts: Iterator[pl.DataFrame] | None = iter(samples)
        self._note_unsorted = note_unsorted
        self._keep_source = keep_source
        self.height = 0  # rows kept, once every day was taken
        self.peak_rows = 0  # the most input rows held at once (one part)
        self._spans: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _prepare(self, frame: pl.DataFrame) -> _Part:
        u = _codes(frame.get_column("user"), self.users)
        t = frame.get_column("time").to_physical().to_numpy()
        m = _codes(frame.get_column("metric"), METRIC_NAMES).astype(np.uint8)
        if len(t) > 1 and bool(np.any(t[1:] < t[:-1])):
            if self._note_unsorted:
                self.report.notes.append("input was not in time order: sorted (results do not depend on input order)")
            pos = np.argsort(t, kind="stable")
            return _Part(frame, u[pos], t[pos], m[pos], pos)
        return _Part(frame, u, t, m, None)

    def _days(self) -> Iterator[tuple[_Part, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per day, cleaned: (its part, user code, time ns, metric code, row in the part)."""
        if self._parts is None:
            raise RuntimeError("a block's days can be taken once")
        parts, self._parts = self._parts, None
        for frame in parts:
            part = self._prepare(frame)
            self.peak_rows = max(self.peak_rows, frame.height)
            del frame
            t = part.t
            if not len(t):
                continue
            first, last = int(t[0]) // DAY_NS, int(t[-1]) // DAY_NS
            bounds = np.searchsorted(t, np.arange(first + 1, last + 1, dtype=np.int64) * DAY_NS)
            bounds = np.unique(np.concatenate(([0], bounds, [len(t)])))
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                u, td, m = part.u[lo:hi], t[lo:hi], part.m[lo:hi]
                pos = np.arange(lo, hi) if part.pos is None else part.pos[lo:hi]
                if len(self.users) > 1:
                    order = np.argsort(u.astype(np.uint16), kind="stable") if len(self.users) < 65536 else np.argsort(u, kind="stable")
                    u, td, m, pos = u[order], td[order], m[order], pos[order]
                u, td, m, pos = self._drop_duplicates(part.frame, u, td, m, pos)
                self.height += len(td)
                self.report.rows_kept += len(td)
                self._spans.append(_run_ends(u, td))
                yield part, u, td, m, pos

    def _drop_duplicates(
        self, frame: pl.DataFrame, u: np.ndarray, t: np.ndarray, m: np.ndarray, pos: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        same = (t[1:] == t[:-1]) & (u[1:] == u[:-1])  # rows sharing a user and time are adjacent
        if not same.any():
            return u, t, m, pos
        in_run = np.zeros(len(t), bool)
        in_run[1:] |= same
        in_run[:-1] |= same
        cand = np.flatnonzero(in_run)
        first = np.ones(len(cand), bool)
        first[1:] = ~same[cand[1:] - 1]
        run = np.cumsum(first)
        sub = np.lexsort((pos[cand], m[cand], run))  # within a user and time: by metric name, then input order
        u, t, m, pos = (a.copy() for a in (u, t, m, pos))  # may be views of the input
        t[cand], u[cand], m[cand], pos[cand] = t[cand][sub], u[cand][sub], m[cand][sub], pos[cand][sub]
        rows = pl.Series(pos[cand])
        flags = frame.select(pl.col("value").gather(rows), pl.col("source").gather(rows)).with_columns(
            pl.Series("run", run), pl.Series("m", m[cand])
        )
        key_same = ((pl.col("run") == pl.col("run").shift()) & (pl.col("m") == pl.col("m").shift())).fill_null(False)
        exact = key_same & (pl.col("value") == pl.col("value").shift()) & (pl.col("source") == pl.col("source").shift())
        flags = flags.select(key_same.alias("dup"), exact.fill_null(False).alias("exact"))
        dup = flags.get_column("dup").to_numpy()
        n_dup = int(dup.sum())
        if not n_dup:
            return u, t, m, pos
        dropped = self.report.dropped
        n_exact = int(flags.get_column("exact").sum())
        if n_exact:
            dropped["exact_duplicate"] = dropped.get("exact_duplicate", 0) + n_exact
        if n_dup - n_exact:
            dropped["conflicting_duplicate"] = dropped.get("conflicting_duplicate", 0) + n_dup - n_exact
        keep = np.ones(len(t), bool)
        keep[cand[dup]] = False
        return u[keep], t[keep], m[keep], pos[keep]

    def _frame_of(self, part: _Part, u: np.ndarray, t: np.ndarray, m: np.ndarray, pos: np.ndarray) -> pl.DataFrame:
        idx = pl.Series(pos)
        return pl.DataFrame(
            [
                pl.Series("user", u, pl.UInt32).cat.to(pl.Enum(list(self.users))),
                pl.Series("time", t).cast(SAMPLES_SCHEMA["time"]),
                pl.Series("metric", m, pl.UInt32).cat.to(pl.Enum(list(METRIC_NAMES))),
                part.frame.get_column("value").gather(idx),
                part.frame.get_column("source").gather(idx) if self._keep_source else pl.Series("source", [], pl.String).extend_constant(None, len(t)),
            ]
        )

    def days(self) -> Iterator[pl.DataFrame]:
        """One batch per UTC day of data, in order, for the detector: ``user`` and ``metric``
        as enums of the same strings (no string per row is built), ``source`` empty unless
        kept."""
        for day in self._days():
            yield self._frame_of(*day)

    def spans(self) -> pl.DataFrame:
        """First and last sample time per user, once every day was taken."""
        schema = {"user": pl.String(), "start": pl.Datetime("ns", "UTC"), "end": pl.Datetime("ns", "UTC")}
        if not self._spans:
            return pl.DataFrame(schema=schema)
        runs = pl.DataFrame({k: np.concatenate([s[i] for s in self._spans]) for i, k in enumerate(("u", "start", "end"))})
        per = runs.group_by("u").agg(pl.col("start").min(), pl.col("end").max()).sort("u")
        names = pl.Series("user", list(self.users), pl.String).gather(per.get_column("u"))
        return pl.DataFrame([names, per.get_column("start").cast(schema["start"]), per.get_column("end").cast(schema["end"])])

    def to_frame(self) -> pl.DataFrame:
        """Every cleaned sample in one frame ordered by user, metric, time (takes the days)."""
        frames = [empty_samples(), *(f.with_columns(pl.col("user", "metric").cast(pl.String)) for f in self.days())]
        return pl.concat(frames, how="vertical").sort("user", "metric", "time", maintain_order=True)


def _run_ends(u: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run of one user in a day's rows (ordered by user, time): user, first and last time."""
    if not len(u):
        return u, t, t
    starts = np.concatenate(([0], np.flatnonzero(u[1:] != u[:-1]) + 1))
    ends = np.append(starts[1:], len(u)) - 1
    return u[starts], t[starts], t[ends]


def clean_samples(frame: pl.DataFrame, report: InputReport | None = None) -> pl.DataFrame:
    """Cleaned samples (see :class:`SampleBlock`) in one frame ordered by user, metric, time."""
    return SampleBlock(frame, report, keep_source=True).to_frame()


def _read_source(registry: SourceRegistry, path: Path, kind: str | None, source: Any = None) -> pl.DataFrame:
    source = source if source is not None else registry.open(path, kind)
    read = getattr(source, "read", None)  # whole-file fast path where an adapter offers one
    if callable(read):
        return read()
    return run_sync(collect([source]))


def _collect_part(source: Any, lf: pl.LazyFrame, name: str) -> pl.DataFrame:
    """A part of a lazily read file, validated; where it is not valid, the adapter's whole-file
    read names the error (file, row, field) as it would have without parts."""
    try:
        return validate_samples(lf.collect(), source=name)
    except (ParseError, pl.exceptions.PolarsError) as exc:
        source.read()  # raises the file-level error
        raise ParseError(f"cannot read: {str(exc).splitlines()[0]}", source=name) from None


def _utc_ns(lf: pl.LazyFrame) -> pl.Expr | None:
    """The time column as UTC nanoseconds, read as ``validate_samples`` reads it, if it is a
    datetime column."""
    dtype = lf.collect_schema()["time"]
    if not isinstance(dtype, pl.Datetime):
        return None
    t = pl.col("time")
    if dtype.time_zone is None:
        t = t.dt.replace_time_zone("UTC")
    return t.dt.convert_time_zone("UTC").dt.cast_time_unit("ns").to_physical()


def _time_ordered(lf: pl.LazyFrame) -> tuple[int, int] | None:
    """First and last time (UTC ns) of a file whose rows are in time order, else None."""
    try:
        t = _utc_ns(lf)
        if t is None:
            return None
        first, last, back, nulls = (
            lf.select(t.min().alias("a"), t.max().alias("b"), (t.diff() < 0).any().alias("c"), t.null_count().alias("d")).collect().row(0)
        )
    except pl.exceptions.PolarsError:
        return None
    return None if back or nulls or first is None else (first, last)


@dataclass
class _Planned:
    path: Path
    source: Any
    users: list[str]
    frame: pl.DataFrame | None  # kept when the users could only be learnt by reading
    lazy: pl.LazyFrame | None = None  # read in parts where the adapter can (samples Parquet)
    rows: int = 0  # known without reading where ``lazy`` is


PART_ROWS = 1_000_000  # rows read at a time from a file in time order


def iter_input_blocks(
    paths: Sequence[str | Path],
    registry: SourceRegistry | None = None,
    kind: str | None = None,
    *,
    keep_source: bool = False,
    part_rows: int = PART_ROWS,
) -> tuple[InputReport, Iterator[SampleBlock], int]:
    """Plan, then read lazily: cleaned samples in blocks that share no user (one block per
    file unless files share users), so each block runs through the detector on its own with
    identical results.

    Memory: where the adapter can read a file in parts (samples Parquet), a block whose
    files are in time order (each sorted by time, and each ending before the next begins) is
    read ``part_rows`` rows at a time and cleaned a day at a time, so at most a part and the
    rows of one day of its users are held; any other block is held whole, one block at a time.

    Returns (report, blocks, number of blocks). The report's file list is complete on
    return; its counts are complete once every block's days were taken.
    """
    registry = registry or SourceRegistry.discover()
    report = InputReport()
    planned: list[_Planned] = []
    for p in paths:
        path = Path(p)
        source = registry.open(path, kind)
        scan_fn = getattr(source, "scan", None)
        lazy = scan_fn() if callable(scan_fn) else None
        users, rows, frame = None, 0, None
        if lazy is not None:
            try:
                users, rows = lazy.select(pl.col("user").cast(pl.String).unique().drop_nulls().implode(), pl.len()).collect().row(0)
            except pl.exceptions.PolarsError:
                lazy = None  # read() will name the problem
        if users is None:
            users_fn = getattr(source, "users", None)
            users = users_fn() if callable(users_fn) else None
        if users is None:
            frame = _read_source(registry, path, kind, source).select(list(SAMPLES_SCHEMA))
            users = frame.get_column("user").unique().to_list()
        report.files.append({"name": path.name, "sha256": _sha256(path) if path.is_file() else None, "rows": None})
        planned.append(_Planned(path, source, users, frame, lazy, rows))
    # union files that share a user: they must be cleaned and ordered together
    parent = list(range(len(planned)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, item in enumerate(planned):
        for user in item.users:
            if user in owner:
                parent[find(i)] = find(owner[user])
            else:
                owner[user] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(planned)):
        groups.setdefault(find(i), []).append(i)
    # deterministic block order whatever the file order: by smallest user id (empty files last)
    order = sorted(groups.values(), key=lambda g: (min((u for i in g for u in planned[i].users), default="\uffff"), g))

    def counted(i: int, rows: int) -> bool:
        """Count a file's rows; False (and say so) if it has none."""
        report.files[i]["rows"] = rows
        report.rows_read += rows
        if rows == 0:
            report.dropped["empty_file"] = report.dropped.get("empty_file", 0) + 1
            report.notes.append(f"{planned[i].path.name}: no samples")
        return rows > 0

    def in_time_order(group: list[int]) -> bool:
        items = [planned[i] for i in group if planned[i].rows or planned[i].lazy is None]
        if any(it.lazy is None for it in items) or sum(it.rows for it in items) <= part_rows:
            return False  # small enough to read whole (or no reading in parts)
        spans = [_time_ordered(it.lazy) for it in items if it.lazy is not None]
        return all(s is not None for s in spans) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # type: ignore[index]

    def day_parts(group: list[int]) -> Iterator[pl.DataFrame]:
        """The group's samples in parts of about ``part_rows`` rows cut at UTC midnight."""
        carry: pl.DataFrame | None = None
        for i in group:
            item = planned[i]
            lf, item.lazy = item.lazy, None
            if not counted(i, item.rows) or lf is None:
                continue
            for offset in range(0, item.rows, part_rows):
                part = _collect_part(item.source, lf.slice(offset, part_rows), item.path.name)
                part = part if carry is None else pl.concat([carry, part], how="vertical")
                t = part.get_column("time").to_physical()
                cut = int(t.search_sorted(int(t[-1]) // DAY_NS * DAY_NS, side="left"))
                if cut:
                    yield part.slice(0, cut)
                carry = part.slice(cut)
        if carry is not None and carry.height:
            yield carry

    def blocks() -> Iterator[SampleBlock]:
        for group in order:
            if in_time_order(group):
                users = {u for i in group for u in planned[i].users}
                yield SampleBlock(day_parts(group), report, users=users, note_unsorted=False, keep_source=keep_source)
                continue
            frames, spans = [], []
            for i in group:
                item = planned[i]
                in_parts = item.lazy is not None
                if item.lazy is not None:
                    frame = _collect_part(item.source, item.lazy, item.path.name)
                else:
                    frame = item.frame if item.frame is not None else _read_source(registry, item.path, kind, item.source)
                    frame = frame.select(list(SAMPLES_SCHEMA))
                item.frame = item.lazy = None
                if not counted(i, frame.height):
                    continue
                t = frame.get_column("time")
                # a file read in parts counts as time-ordered, as the adapter's whole read sorts it
                spans.append((t.min(), t.max(), in_parts or t.is_sorted()))
                frames.append(frame)
            if not frames:
                continue
            if not all(ok for _, _, ok in spans) or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
                report.notes.append("input was not in time order: sorted (results do not depend on input order)")
            yield SampleBlock(pl.concat(frames, how="vertical"), report, note_unsorted=False, keep_source=keep_source)

    return report, blocks(), len(order)


def load_input_blocks(
    paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None
) -> tuple[list[pl.DataFrame], InputReport]:
    """All blocks of :func:`iter_input_blocks` at once as frames ordered by user, metric,
    time (small inputs, tests)."""
    report, it, _ = iter_input_blocks(paths, registry, kind, keep_source=True)
    return [b.to_frame() for b in it], report


def load_inputs(
    paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None
) -> tuple[pl.DataFrame, InputReport]:
    """Every sample of every path, cleaned, in one frame ordered by user, metric, time."""
    blocks, report = load_input_blocks(paths, registry, kind)
    return pl.concat([empty_samples(), *blocks], how="vertical"), report


def read_samples(paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None) -> pl.DataFrame:
    """Every sample of every path, cleaned (see :func:`load_inputs`)."""
    return load_inputs(paths, registry, kind)[0]


def time_batches(frame: pl.DataFrame, batch_s: int = BATCH_S) -> list[pl.DataFrame]:
    """Split samples into batches of ``batch_s`` of data time, in time order (the live
    cadence); within a batch each user's samples keep their order."""
    if frame.height == 0:
        return []
    key = (pl.col("time").dt.epoch("s") // batch_s).alias("_batch")
    keyed = frame.with_columns(key).sort("_batch", maintain_order=True)
    return [part.drop("_batch") for part in keyed.partition_by("_batch", maintain_order=True)]


# -- labels and pseudonyms -------------------------------------------------------------------


def read_labels(path: str | Path) -> pl.DataFrame:
    """Labelled episodes: CSV or Parquet with ``user``, ``start``, ``end`` (ISO 8601, UTC if naive)."""
    path = Path(path)
    try:
        frame = pl.read_parquet(path) if path.suffix.lower() == ".parquet" else pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ParseError(f"cannot read labels: {str(exc).splitlines()[0]}", source=path) from None
    for col in ("user", "start", "end"):
        if col not in frame.columns:
            raise ParseError("missing column", source=path, field=col)
    out = []
    for col in ("start", "end"):
        s = frame.get_column(col)
        if s.dtype == pl.String:
            parsed = s.str.to_datetime(time_unit="ns", time_zone="UTC", strict=False)
            bad = parsed.is_null() & s.is_not_null()
            if bad.any():
                line = int(bad.arg_max() or 0) + 2
                raise ParseError(f"not an ISO 8601 time: {s[line - 2]!r}", source=path, position=f"line {line}", field=col)
            s = parsed
        elif isinstance(s.dtype, pl.Datetime):
            s = (s.dt.replace_time_zone("UTC") if s.dtype.time_zone is None else s.dt.convert_time_zone("UTC")).dt.cast_time_unit("ns")
        else:
            raise ParseError(f"expected a time, got {s.dtype}", source=path, field=col)
        out.append(s.alias(col))
    labels = pl.DataFrame([frame.get_column("user").cast(pl.String), *out])
    bad = labels.with_row_index().filter(pl.col("end") <= pl.col("start"))
    if bad.height:
        raise ParseError("episode ends before it starts", source=path, position=f"line {int(bad.item(0, 'index')) + 2}", field="end")
    return labels.sort("user", "start")
