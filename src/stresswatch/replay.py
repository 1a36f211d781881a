"""The researcher's path: recorded samples through the same pipeline objects as the engine.

``replay(paths)`` returns polars frames; with ``out=DIR`` it also writes ``windows.parquet``,
``alerts.parquet`` (every alert raised, with the consent verdict) and ``summary.json``.
Alerts go to an in-memory transport: a replay alerts no one, but records what consent
would have let through.

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
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from .alerts.transport import MemoryTransport
from .config import Settings
from .consent.ledger import ConsentLedger
from .detect import Detector
from .engine import Clock, Pipeline, PipelineReport, utc_now
from .errors import ConfigError, ParseError, StorageError
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
    input order wins), then order by time and user. Counts go to ``report``."""
    report = report if report is not None else InputReport()
    n = frame.height
    frame = frame.unique(maintain_order=True)
    if frame.height < n:
        report.dropped["exact_duplicate"] = report.dropped.get("exact_duplicate", 0) + n - frame.height
    n = frame.height
    frame = frame.unique(subset=["user", "metric", "time"], keep="first", maintain_order=True)
    if frame.height < n:
        report.dropped["conflicting_duplicate"] = report.dropped.get("conflicting_duplicate", 0) + n - frame.height
    if not frame.get_column("time").is_sorted():
        report.notes.append("input was not in time order: sorted (results do not depend on input order)")
    return frame.sort("time", "user", "metric", "source", "value")


def load_inputs(
    paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None
) -> tuple[pl.DataFrame, InputReport]:
    """Every sample of every path, cleaned and ordered, with the report of what was dropped."""
    registry = registry or SourceRegistry.discover()
    report = InputReport()
    frames = [empty_samples()]
    for p in paths:
        path = Path(p)
        frame = run_sync(collect([registry.open(path, kind)]))
        report.files.append({"name": path.name, "sha256": _sha256(path) if path.is_file() else None, "rows": frame.height})
        if frame.height == 0:
            report.dropped["empty_file"] = report.dropped.get("empty_file", 0) + 1
            report.notes.append(f"{path.name}: no samples")
        frames.append(frame)
    frame = pl.concat(frames, how="vertical")
    report.rows_read = frame.height
    frame = clean_samples(frame, report)
    report.rows_kept = frame.height
    return frame, report


def read_samples(paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None) -> pl.DataFrame:
    """Every sample of every path, cleaned and ordered by time then user (see :func:`load_inputs`)."""
    return load_inputs(paths, registry, kind)[0]


def time_batches(frame: pl.DataFrame, batch_s: int = BATCH_S) -> list[pl.DataFrame]:
    """Split time-ordered samples into batches of ``batch_s`` of data time (the live cadence)."""
    if frame.height == 0:
        return []
    key = pl.col("time").dt.epoch("s") // batch_s
    return [part for _, part in frame.group_by(key, maintain_order=True)]


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


def _run_pipeline(
    samples: pl.DataFrame,
    settings: Settings,
    ledger: ConsentLedger | None,
    clock: Clock,
    speed: float,
    on_batch: Callable[[int, int], None] | None,
) -> PipelineReport:
    pipeline = Pipeline(
        Detector(settings.detector),
        MemoryTransport(),
        ledger=ledger,
        clock=clock,
        alert_expiry_s=settings.mqtt.alert_expiry_s,
        keep_windows=True,
    )
    batches = time_batches(samples)
    for i, batch in enumerate(batches):
        pipeline.process(batch)
        if speed > 0:
            time.sleep(BATCH_S / speed)
        if on_batch:
            on_batch(i + 1, len(batches))
    pipeline.finish()
    return pipeline.report


def _summary(
    samples: pl.DataFrame,
    windows: pl.DataFrame,
    alerts: pl.DataFrame,
    settings: Settings,
    inputs: InputReport,
    evaluation: pl.DataFrame | None,
) -> dict[str, Any]:
    from . import __version__

    per_user = (
        samples.group_by("user")
        .agg(((pl.col("time").max() - pl.col("time").min()).dt.total_seconds() / 86400).alias("days"))
        .sort("user")
    )
    user_days = float(per_user.get_column("days").sum()) if per_user.height else 0.0
    states = windows.group_by("state").len().sort("state")
    sent = int(alerts.get_column("sent").sum()) if alerts.height else 0
    return {
        "package_version": __version__,
        "inputs": inputs.as_dict(),
        "users": per_user.height,
        "user_days": round(user_days, 6),
        "days": round(
            (samples.get_column("time").max() - samples.get_column("time").min()).total_seconds() / 86400, 6  # type: ignore[operator]
        )
        if samples.height
        else 0.0,
        "windows": windows.height,
        "windows_by_state": {s: int(n) for s, n in states.iter_rows()},
        "alerts_raised": alerts.height,
        "alerts_consented": sent,
        "alerts_withheld": alerts.height - sent,
        "alerts_per_user_day": round(alerts.height / user_days, 6) if user_days else None,
        # Only what shapes results: no machine paths, no broker credentials.
        "config": {"detector": settings.detector.model_dump(mode="json"), "mqtt": {"prefix": settings.mqtt.prefix}},
        "evaluation": evaluation.filter(pl.col("user") == "ALL").to_dicts()[0] if evaluation is not None and evaluation.height else None,
    }


def evaluate_alerts(alerts: pl.DataFrame, labels: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    """Episode-level metrics per user and overall (row ``user == "ALL"``); see :mod:`stresswatch.evaluate`."""
    from .evaluate import evaluate

    return evaluate(alerts, labels, samples)


def replay(
    paths: Sequence[str | Path] | pl.DataFrame,
    *,
    out: str | Path | None = None,
    settings: Settings | None = None,
    consent_db: str | Path | None = None,
    labels: str | Path | pl.DataFrame | None = None,
    pseudonym_key: bytes | None = None,
    speed: float = 0.0,
    clock: Clock = utc_now,
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
    if isinstance(paths, pl.DataFrame):
        inputs = InputReport(rows_read=paths.height)
        samples = clean_samples(paths.select(list(SAMPLES_SCHEMA)), inputs)
        inputs.rows_kept = samples.height
    else:
        samples, inputs = load_inputs(paths, registry, kind)
    label_frame = labels if isinstance(labels, pl.DataFrame) or labels is None else read_labels(labels)

    ledger = None
    if consent_db is not None:
        if not Path(consent_db).is_file():
            raise StorageError("no consent ledger here", path=consent_db)
        ledger = ConsentLedger(consent_db)
    try:
        report = _run_pipeline(samples, settings, ledger, clock, speed, on_batch)
    finally:
        if ledger is not None:
            ledger.close()
    windows, alerts = report.windows_frame(), report.alerts_frame()
    evaluation = evaluate_alerts(alerts, label_frame, samples) if label_frame is not None else None
    if pseudonym_key is not None:
        fn = pseudonymiser(pseudonym_key)
        windows, alerts, samples = (_pseudonymise(f, fn) for f in (windows, alerts, samples))
        if evaluation is not None:
            evaluation = evaluation.with_columns(
                pl.when(pl.col("user") == "ALL").then(pl.col("user")).otherwise(pl.col("user").map_elements(fn, return_dtype=pl.String))
            )
    summary = _summary(samples, windows, alerts, settings, inputs, evaluation)
    result = ReplayResult(windows, alerts, summary, evaluation, report)
    if out is not None:
        write_outputs(result, Path(out))
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
            staged.append((tmp, out / name))
        tmp = out / ".summary.json.tmp"
        tmp.write_text(json.dumps(result.summary, indent=2, sort_keys=True, default=str) + "\n")
        staged.append((tmp, out / "summary.json"))
        for tmp, final in staged:
            tmp.replace(final)
    except OSError as exc:
        raise StorageError(f"cannot write replay output: {exc}", path=out) from None
