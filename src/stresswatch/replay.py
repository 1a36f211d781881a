"""The researcher's path: recorded samples through the same pipeline objects as the engine.

``replay(paths)`` returns polars frames; with ``out=DIR`` it also writes ``windows.parquet``,
``alerts.parquet`` (every alert raised, with the consent verdict) and ``summary.json``.
Alerts go through the same :class:`Dispatcher` as the engine's (consent gate, groups,
cooldown, quiet hours, escalation), with an in-memory outbox and transport and the data's
time as its clock: a replay alerts no one, but records what consent would have let through
and to whom.

Determinism: inputs are read whole, cleaned (exact duplicates dropped, conflicting
duplicates resolved by input order, each counted in the input report), ordered by time
then user, and fed in hourly batches of data time. So the same samples give byte-identical
outputs whatever their chunking into files or batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from .alerts.dispatch import Dispatcher
from .alerts.outbox import Outbox
from .alerts.transport import MemoryTransport
from .config import Settings
from .consent.ledger import ConsentLedger
from .detect import Detector
from .pipeline import DataClock, Pipeline, PipelineReport
from .errors import ConfigError, ParseError, StorageError
from .fsio import atomic_write, commit_rename, fsync_file
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


def pseudonymiser(key: bytes) -> Callable[[str], str]:
    """Keyed hash of a user id: stable for one key, not reversible without it."""

    def pseudonym(user: str) -> str:
        return "p-" + hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:16]

    return pseudonym


def _pseudonymise(frame: pl.DataFrame, fn: Callable[[str], str]) -> pl.DataFrame:
    if "user" not in frame.columns or frame.height == 0:
        return frame
    mapping = {u: fn(u) for u in frame.get_column("user").unique().to_list()}
    return frame.with_columns(pl.col("user").replace_strict(mapping, return_dtype=pl.String))


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    windows: pl.DataFrame
    alerts: pl.DataFrame
    summary: dict[str, Any]
    evaluation: pl.DataFrame | None = None  # per user and overall, when labels were given
    report: PipelineReport | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (not written: outputs stay deterministic)


class _Timed:
    """Wraps an iterator and adds the time spent producing items to ``timings[key]``."""

    def __init__(self, it: Iterable[pl.DataFrame], timings: dict[str, float], key: str) -> None:
        self._it, self._timings, self._key = iter(it), timings, key

    def __iter__(self) -> Iterator[pl.DataFrame]:
        return self

    def __next__(self) -> pl.DataFrame:
        started = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self._timings[self._key] = self._timings.get(self._key, 0.0) + time.perf_counter() - started


def _run_pipeline(
    blocks: Iterable[pl.DataFrame],
    n_blocks: int,
    settings: Settings,
    ledger: ConsentLedger,
    speed: float,
    on_batch: Callable[[int, int], None] | None,
) -> tuple[PipelineReport, pl.DataFrame]:
    """Run every block; returns the report and each user's first and last sample time.

    The outbox is an in-memory SQLite database: a replay is re-run from its inputs, so it
    needs the outbox's logic (groups, cooldown, escalation), not its durability, and no file
    writes keep it fast and leave nothing behind. The clock is the data's: each batch sets it
    to its last sample (it may go back between blocks, which share no user)."""
    clock = DataClock()
    with Outbox(":memory:") as outbox:
        dispatcher = Dispatcher.from_settings(settings, outbox, ledger, MemoryTransport(), clock=clock)
        pipeline = Pipeline(Detector(settings.detector), dispatcher, keep_windows=True, keep_alerts=True, data_clock=clock)

        def feed(batch: pl.DataFrame) -> None:
            clock.set_to_end_of(batch)
            pipeline.process(batch)
            pipeline.tick()

        spans: list[pl.DataFrame] = []
        if speed > 0:
            # a demonstration in real time: every user's hour together, as the engine sees them
            everything = pl.concat([empty_samples(), *blocks], how="vertical")
            spans.append(user_spans(everything))
            batches = time_batches(everything, BATCH_S)
            for i, batch in enumerate(batches):
                feed(batch)
                time.sleep(BATCH_S / speed)
                if on_batch:
                    on_batch(i + 1, len(batches))
        else:
            # as fast as possible, one block at a time: blocks share no user, and any chunking of
            # a user's time-ordered samples gives the same windows (streaming equals batch)
            for i, block in enumerate(blocks):
                spans.append(user_spans(block))
                for batch in time_batches(block, 86400):
                    feed(batch)
                if on_batch:
                    on_batch(i + 1, n_blocks)
        all_spans = pl.concat([user_spans(empty_samples()), *spans], how="vertical").sort("user")
        if all_spans.height:
            last = all_spans.get_column("end").max()
            assert isinstance(last, datetime)
            clock.set(last)
        pipeline.finish()
    return pipeline.report, all_spans


def user_spans(samples: pl.DataFrame) -> pl.DataFrame:
    """First and last sample time per user."""
    schema = {"user": pl.String(), "start": pl.Datetime("ns", "UTC"), "end": pl.Datetime("ns", "UTC")}
    spans = samples.group_by("user").agg(pl.col("time").min().alias("start"), pl.col("time").max().alias("end"))
    return pl.concat([pl.DataFrame(schema=schema), spans], how="vertical")


def _summary(
    spans: pl.DataFrame,
    windows: pl.DataFrame,
    alerts: pl.DataFrame,
    settings: Settings,
    inputs: InputReport,
    evaluation: pl.DataFrame | None,
) -> dict[str, Any]:
    from . import __version__

    user_days = float(spans.select(((pl.col("end") - pl.col("start")).dt.total_seconds() / 86400).sum()).item() or 0.0)
    span_days = (
        (spans.get_column("end").max() - spans.get_column("start").min()).total_seconds() / 86400  # type: ignore[operator]
        if spans.height
        else 0.0
    )
    states = windows.group_by("state").len().sort("state")
    sent = int(alerts.get_column("sent").sum()) if alerts.height else 0
    return {
        "package_version": __version__,
        "inputs": inputs.as_dict(),
        "users": spans.height,
        "user_days": round(user_days, 6),
        "days": round(span_days, 6),
        "windows": windows.height,
        "windows_by_state": {st: int(n) for st, n in states.iter_rows()},
        "alerts_raised": alerts.height,
        "alerts_consented": sent,
        "alerts_withheld": alerts.height - sent,
        "alerts_per_user_day": round(alerts.height / user_days, 6) if user_days else None,
        # Only what shapes results: no machine paths, no broker credentials.
        "config": {"detector": settings.detector.model_dump(mode="json"), "mqtt": {"prefix": settings.mqtt.prefix}},
        "evaluation": evaluation.filter(pl.col("user") == "ALL").to_dicts()[0] if evaluation is not None and evaluation.height else None,
    }


def observed_spans(windows: pl.DataFrame) -> pl.DataFrame:
    """Per user, from the end of calibration to the last window: the span in which the
    detector could alert, and so the span evaluated against labels."""
    return (
        windows.group_by("user")
        .agg(
            pl.col("window_start").filter(pl.col("state") != "calibrating").min().alias("start"),
            pl.col("window_end").max().alias("end"),
        )
        .drop_nulls()
        .sort("user")
    )


def evaluate_alerts(alerts: pl.DataFrame, labels: pl.DataFrame, windows: pl.DataFrame) -> pl.DataFrame:
    """Episode-level metrics per user and overall (row ``user == "ALL"``), over each user's
    span after calibration; see :func:`stresswatch.evaluate.evaluate`."""
    from .evaluate import evaluate

    ev = evaluate(alerts, labels, observed_spans(windows))
    overall = pl.DataFrame([{"user": "ALL", **ev.overall}])
    if ev.by_user.height == 0:
        return overall
    return pl.concat([ev.by_user, overall], how="diagonal_relaxed")


def replay(
    paths: Sequence[str | Path] | pl.DataFrame,
    *,
    out: str | Path | None = None,
    settings: Settings | None = None,
    consent_db: str | Path | None = None,
    labels: str | Path | pl.DataFrame | None = None,
    pseudonym_key: bytes | None = None,
    speed: float = 0.0,
    registry: SourceRegistry | None = None,
    kind: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Replay samples (paths, or a samples frame) through the live pipeline.

    ``consent_db``: a consent ledger to mark which alerts would have been sent (default: no
    one consented). ``labels``: episodes to evaluate against. ``pseudonym_key``: replace user
    ids by keyed hashes in every output. ``speed``: 0 as fast as possible, else a multiple
    of real time.
    """
    settings = settings or Settings()
    timings: dict[str, float] = {"read": 0.0}
    started = time.perf_counter()
    if isinstance(paths, pl.DataFrame):
        inputs = InputReport(rows_read=paths.height)
        blocks: Iterable[pl.DataFrame] = [clean_samples(paths.select(list(SAMPLES_SCHEMA)), inputs)] if paths.height else []
        inputs.rows_kept = sum(b.height for b in blocks)
        n_blocks = len(blocks)  # type: ignore[arg-type]
    else:
        inputs, blocks, n_blocks = iter_input_blocks(paths, registry, kind)
    label_frame = labels if isinstance(labels, pl.DataFrame) or labels is None else read_labels(labels)
    timings["read"] += time.perf_counter() - started

    if consent_db is not None and not Path(consent_db).is_file():
        raise StorageError("no consent ledger here", path=consent_db)
    ledger = ConsentLedger(consent_db if consent_db is not None else ":memory:")  # none given: no one consented
    started, read_before = time.perf_counter(), timings["read"]
    try:
        report, spans = _run_pipeline(_Timed(blocks, timings, "read"), n_blocks, settings, ledger, speed, on_batch)
    finally:
        ledger.close()
    del blocks
    windows, alerts = report.windows_frame(), report.alerts_frame()
    # the blocks are read lazily while the pipeline runs: count that time as reading
    timings["pipeline"] = time.perf_counter() - started - (timings["read"] - read_before)
    started = time.perf_counter()
    evaluation = evaluate_alerts(alerts, label_frame, windows) if label_frame is not None else None
    if pseudonym_key is not None:
        fn = pseudonymiser(pseudonym_key)
        windows, alerts, spans = (_pseudonymise(f, fn) for f in (windows, alerts, spans))
        if evaluation is not None:
            evaluation = evaluation.with_columns(
                pl.when(pl.col("user") == "ALL").then(pl.col("user")).otherwise(pl.col("user").map_elements(fn, return_dtype=pl.String))
            )
    summary = _summary(spans, windows, alerts, settings, inputs, evaluation)
    timings["evaluate"] = time.perf_counter() - started
    result = ReplayResult(windows, alerts, summary, evaluation, report, timings)
    if out is not None:
        started = time.perf_counter()
        write_outputs(result, Path(out))
        timings["write"] = time.perf_counter() - started
    return result


def sweep(
    samples: pl.DataFrame,
    base: Settings,
    grid: Mapping[str, Sequence[Any]],
    *,
    labels: pl.DataFrame | None = None,
    on_run: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """One replay per combination of the ``grid`` values; one row each with its metrics."""
    from .config import load_settings

    keys = sorted(grid)
    combos = list(itertools.product(*(grid[k] for k in keys)))
    rows = []
    for i, combo in enumerate(combos):
        overrides = {**_flatten(base.model_dump(mode="json", exclude={"store"})), **dict(zip(keys, combo))}
        settings = load_settings(env={}, overrides=overrides)
        res = replay(samples, settings=settings, labels=labels)
        row: dict[str, Any] = {k: str(v) for k, v in zip(keys, combo)}
        row |= {
            "alerts_raised": res.summary["alerts_raised"],
            "alerts_per_user_day": res.summary["alerts_per_user_day"],
        }
        if res.evaluation is not None:
            overall = res.evaluation.filter(pl.col("user") == "ALL").drop("user").to_dicts()[0]
            row |= overall
        rows.append(row)
        if on_run:
            on_run(i + 1, len(combos))
    return pl.DataFrame(rows)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat |= _flatten(v, key + ".")
        elif v is not None:
            flat[key] = v
    return flat


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``key=v1,v2`` strings to a grid of values (one value: a plain override)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE[,VALUE...], got {item!r}", source="--set")
        grid[key.strip()] = [v.strip() for v in value.split(",")]
    return grid


def write_outputs(result: ReplayResult, out: Path) -> None:
    """Write every table atomically: each goes to a temporary name, then is renamed."""
    tables = {"windows.parquet": result.windows, "alerts.parquet": result.alerts}
    if result.evaluation is not None:
        tables["evaluation.parquet"] = result.evaluation
    try:
        out.mkdir(parents=True, exist_ok=True)
        staged = []
        for name, frame in tables.items():
            tmp = out / f".{name}.tmp"
            frame.write_parquet(tmp, statistics=False)
            fsync_file(tmp)
            staged.append((tmp, out / name))
        for tmp, final in staged:
            commit_rename(tmp, final)
        summary = json.dumps(result.summary, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(out / "summary.json", summary, mode=0o644)  # last: its presence means the run finished
    except OSError as exc:
        raise StorageError(f"cannot write replay output: {exc}", path=out) from None
