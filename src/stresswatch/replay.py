"""The researcher's path: recorded samples through the same pipeline objects as the engine.

``replay(paths)`` returns polars frames; with ``out=DIR`` it also writes ``windows.parquet``,
``alerts.parquet`` (every alert raised, with the consent verdict) and ``summary.json``.
Alerts go through the same :class:`Dispatcher` as the engine's (consent gate, groups,
cooldown, quiet hours, escalation), with an in-memory outbox and transport and the data's
time as its clock: a replay alerts no one, but records what consent would have let through
and to whom.

Determinism: inputs are cleaned (exact duplicates dropped, conflicting duplicates resolved
by input order, each counted in the input report), ordered by user and time, and fed a UTC
day of data at a time, block of users by block (hourly, every user together, at
``speed > 0``). So the same samples give byte-identical outputs whatever their chunking
into files or batches. Reading: :mod:`stresswatch.replay_input`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import polars as pl

from .alerts.dispatch import Dispatcher
from .alerts.outbox import Outbox
from .alerts.transport import MemoryTransport
from .config import Settings
from .consent.ledger import ConsentLedger
from .detect import Detector
from .pipeline import DataClock, Pipeline, PipelineReport
from .errors import ConfigError, StorageError
from .fsio import atomic_write, commit_rename, fsync_file
from .model import SAMPLES_SCHEMA, empty_samples
from .sources import SourceRegistry

from .replay_input import (  # noqa: F401  (re-exported: callers read inputs through the replay module too)
    BATCH_S,
    PART_ROWS,
    InputReport,
    SampleBlock,
    clean_samples,
    iter_input_blocks,
    load_input_blocks,
    load_inputs,
    read_labels,
    read_samples,
    run_sync,
    time_batches,
)


T = TypeVar("T")


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


class _Timed(Generic[T]):
    """Wraps an iterator and adds the time spent producing items to ``timings[key]``."""

    def __init__(self, it: Iterable[T], timings: dict[str, float], key: str) -> None:
        self._it, self._timings, self._key = iter(it), timings, key

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        started = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self._timings[self._key] = self._timings.get(self._key, 0.0) + time.perf_counter() - started


def _run_pipeline(
    blocks: Iterable[SampleBlock],
    n_blocks: int,
    settings: Settings,
    ledger: ConsentLedger,
    speed: float,
    on_batch: Callable[[int, int], None] | None,
    timings: dict[str, float],
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

        def place(users: Sequence[str]) -> None:
            """Each person's time-of-day slots in their own zone: their consent's, else the
            configuration's (``[detector] user_timezones``, ``timezone``)."""
            for user in users:
                if user not in pipeline.zones:
                    pipeline.place(user, ledger.state(user))

        spans: list[pl.DataFrame] = []
        if speed > 0:
            # a demonstration in real time: every user's hour together, as the engine sees them
            everything = pl.concat([empty_samples(), *(b.to_frame() for b in blocks)], how="vertical")
            spans.append(user_spans(everything))
            place(spans[-1].get_column("user").to_list())
            batches = time_batches(everything, BATCH_S)
            for i, batch in enumerate(batches):
                feed(batch)
                time.sleep(BATCH_S / speed)
                if on_batch:
                    on_batch(i + 1, len(batches))
        else:
            # as fast as possible, one block at a time, a day of data per batch: blocks share no
            # user, and any chunking of a user's time-ordered samples gives the same windows
            # (streaming equals batch)
            for i, block in enumerate(blocks):
                place(block.users)
                for batch in _Timed(block.days(), timings, "read"):  # cleaning a day counts as reading
                    feed(batch)
                spans.append(block.spans())
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
    part_rows: int = PART_ROWS,
) -> ReplayResult:
    """Replay samples (paths, or a samples frame) through the live pipeline.

    ``consent_db``: a consent ledger to mark which alerts would have been sent (default: no
    one consented). ``labels``: episodes to evaluate against. ``pseudonym_key``: replace user
    ids by keyed hashes in every output. ``speed``: 0 as fast as possible, else a multiple
    of real time. ``part_rows``: rows read at a time from files in time order (memory, not
    results: see :func:`iter_input_blocks`).
    """
    settings = settings or Settings()
    timings: dict[str, float] = {"read": 0.0}
    started = time.perf_counter()
    if isinstance(paths, pl.DataFrame):
        inputs = InputReport(rows_read=paths.height)
        blocks: Iterable[SampleBlock] = [SampleBlock(paths.select(list(SAMPLES_SCHEMA)), inputs)] if paths.height else []
        n_blocks = len(blocks)  # type: ignore[arg-type]
    else:
        inputs, blocks, n_blocks = iter_input_blocks(paths, registry, kind, part_rows=part_rows)
    label_frame = labels if isinstance(labels, pl.DataFrame) or labels is None else read_labels(labels)
    timings["read"] += time.perf_counter() - started

    if consent_db is not None and not Path(consent_db).is_file():
        raise StorageError("no consent ledger here", path=consent_db)
    ledger = ConsentLedger(consent_db if consent_db is not None else ":memory:")  # none given: no one consented
    started, read_before = time.perf_counter(), timings["read"]
    try:
        report, spans = _run_pipeline(_Timed(blocks, timings, "read"), n_blocks, settings, ledger, speed, on_batch, timings)
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
