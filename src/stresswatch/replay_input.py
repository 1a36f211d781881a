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
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from .errors import ParseError
from .model import SAMPLES_SCHEMA, empty_samples
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
            "notes": self.notes,
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_samples(frame: pl.DataFrame, report: InputReport | None = None) -> pl.DataFrame:
    """Drop exact duplicates and conflicting duplicates (same user, metric, time; the first in
    input order wins) and order by user, metric, time. Counts go to ``report``.

    The order is fully determined by the kept rows, so outputs do not depend on input order.
    A frame already in time order without repeated times (one user's recording) takes a
    fast path: nothing can be duplicated, and per-user time order is all the detector needs.
    """
    report = report if report is not None else InputReport()
    t = frame.get_column("time")
    if t.is_sorted():
        strictly = frame.height < 2 or not bool((t.diff().drop_nulls().dt.total_nanoseconds() == 0).any())
        if strictly and frame.get_column("user").n_unique() <= 1:
            return frame  # one user's recording in time order: no duplicates possible
    else:
        report.notes.append("input was not in time order: sorted (results do not depend on input order)")
    ordered = frame.sort("user", "metric", "time", maintain_order=True)  # stable: input order among equals
    key_same = (
        (pl.col("user") == pl.col("user").shift())
        & (pl.col("metric") == pl.col("metric").shift())
        & (pl.col("time") == pl.col("time").shift())
    ).fill_null(False)
    exact = key_same & (pl.col("value") == pl.col("value").shift()) & (pl.col("source") == pl.col("source").shift())
    flags = ordered.select(key_same.alias("dup"), exact.fill_null(False).alias("exact"))
    n_dup = int(flags.get_column("dup").sum())
    if n_dup:
        n_exact = int(flags.get_column("exact").sum())
        if n_exact:
            report.dropped["exact_duplicate"] = report.dropped.get("exact_duplicate", 0) + n_exact
        if n_dup - n_exact:
            report.dropped["conflicting_duplicate"] = report.dropped.get("conflicting_duplicate", 0) + n_dup - n_exact
        ordered = ordered.filter(~flags.get_column("dup"))
    return ordered


def _read_source(registry: SourceRegistry, path: Path, kind: str | None, source: Any = None) -> pl.DataFrame:
    source = source if source is not None else registry.open(path, kind)
    read = getattr(source, "read", None)  # whole-file fast path where an adapter offers one
    if callable(read):
        return read()
    return run_sync(collect([source]))


@dataclass
class _Planned:
    path: Path
    source: Any
    users: list[str]
    frame: pl.DataFrame | None  # kept when the users could only be learnt by reading


def iter_input_blocks(
    paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None
) -> tuple[InputReport, Iterator[pl.DataFrame], int]:
    """Plan, then read lazily: cleaned samples in blocks that share no user (one block per
    file unless files share users), so each block runs through the detector on its own with
    identical results, and only one block's samples are in memory at a time where the
    adapter can tell a file's users without reading it (samples Parquet).

    Returns (report, blocks, number of blocks). The report's file list is complete on
    return; its counts are complete once the iterator is exhausted.
    """
    registry = registry or SourceRegistry.discover()
    report = InputReport()
    planned: list[_Planned] = []
    for p in paths:
        path = Path(p)
        source = registry.open(path, kind)
        users_fn = getattr(source, "users", None)
        users = users_fn() if callable(users_fn) else None
        frame = None
        if users is None:
            frame = _read_source(registry, path, kind, source).select(list(SAMPLES_SCHEMA))
            users = frame.get_column("user").unique().to_list()
        report.files.append({"name": path.name, "sha256": _sha256(path) if path.is_file() else None, "rows": None})
        planned.append(_Planned(path, source, users, frame))
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

    def blocks() -> Iterator[pl.DataFrame]:
        for group in order:
            frames = []
            for i in group:
                item = planned[i]
                frame = item.frame if item.frame is not None else _read_source(registry, item.path, kind, item.source)
                item.frame = None
                frame = frame.select(list(SAMPLES_SCHEMA))
                report.files[i]["rows"] = frame.height
                report.rows_read += frame.height
                if frame.height == 0:
                    report.dropped["empty_file"] = report.dropped.get("empty_file", 0) + 1
                    report.notes.append(f"{item.path.name}: no samples")
                    continue
                frames.append(frame)
            if not frames:
                continue
            block = clean_samples(pl.concat(frames, how="vertical"), report)
            report.rows_kept += block.height
            report.notes = sorted(set(report.notes))
            yield block

    return report, blocks(), len(order)


def load_input_blocks(
    paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None
) -> tuple[list[pl.DataFrame], InputReport]:
    """All blocks of :func:`iter_input_blocks` at once (small inputs, tests)."""
    report, it, _ = iter_input_blocks(paths, registry, kind)
    return list(it), report


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
