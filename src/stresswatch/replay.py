"""The researcher's path: recorded samples through the same pipeline objects as the engine.

``replay(paths)`` returns polars frames; ``replay(paths, out=DIR)`` also writes
``windows.parquet`` and ``alerts.parquet``. Alerts are sent to an in-memory transport: a
replay alerts no one, but records what consent would have let through.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from .alerts.transport import MemoryTransport
from .config import Settings
from .consent.ledger import ConsentLedger
from .detect import Detector
from .engine import Clock, Pipeline, PipelineReport, utc_now
from .errors import StorageError
from .sources import SourceRegistry, collect

T = TypeVar("T")


@dataclass(frozen=True)
class ReplayResult:
    windows: pl.DataFrame
    alerts: pl.DataFrame
    report: PipelineReport


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also inside a notebook's running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def read_samples(paths: Sequence[str | Path], registry: SourceRegistry | None = None, kind: str | None = None) -> pl.DataFrame:
    """Every sample of every path, ordered by time then user (stable), in the samples schema."""
    registry = registry or SourceRegistry.discover()
    frame = run_sync(collect([registry.open(p, kind) for p in paths]))
    return frame.sort("time", "user", maintain_order=True)


def time_batches(frame: pl.DataFrame, batch_s: int = 3600) -> list[pl.DataFrame]:
    """Split time-ordered samples into batches of ``batch_s`` of data time (the live cadence)."""
    if frame.height == 0:
        return []
    key = pl.col("time").dt.epoch("s") // batch_s
    return [part for _, part in frame.group_by(key, maintain_order=True)]


def replay(
    paths: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    settings: Settings | None = None,
    consent_db: str | Path | None = None,
    clock: Clock = utc_now,
    registry: SourceRegistry | None = None,
) -> ReplayResult:
    """Replay sample files; see the module docstring. ``consent_db`` is a ledger to consult."""
    settings = settings or Settings()
    samples = read_samples(paths, registry)
    ledger = None
    if consent_db is not None:
        if not Path(consent_db).is_file():
            raise StorageError("no consent ledger here", path=consent_db)
        ledger = ConsentLedger(consent_db)
    pipeline = Pipeline(
        Detector(settings.detector),
        MemoryTransport(),
        ledger=ledger,
        clock=clock,
        alert_expiry_s=settings.mqtt.alert_expiry_s,
        keep_windows=True,
    )
    try:
        for batch in time_batches(samples):
            pipeline.process(batch)
        pipeline.finish()
    finally:
        if ledger is not None:
            ledger.close()
    result = ReplayResult(pipeline.report.windows_frame(), pipeline.report.alerts_frame(), pipeline.report)
    if out is not None:
        write_outputs(result, Path(out))
    return result


def write_outputs(result: ReplayResult, out: Path) -> None:
    """Write both tables atomically: each goes to a temporary name, then is renamed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in (("windows.parquet", result.windows), ("alerts.parquet", result.alerts)):
            tmp = out / f".{name}.tmp"
            frame.write_parquet(tmp)
            tmp.replace(out / name)
    except OSError as exc:
        raise StorageError(f"cannot write replay output: {exc}", path=out) from None
