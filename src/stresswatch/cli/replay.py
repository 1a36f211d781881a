"""``stresswatch replay``: recorded samples through the live pipeline, Parquet out."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import click
import polars as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..config import load_settings
from ..errors import ConfigError, ParseError
from ..extras import require
from ..fsio import atomic_writer
from ..sources import SourceRegistry
from ..replay import load_inputs, parse_grid, read_labels, sweep
from ..replay import replay as run_replay
from ._common import AppContext, console, console_err, pass_app
from .imports import reading_options, source_options

EPILOG = """
\b
Examples:
  stresswatch replay fixtures/demo_cohort.parquet --out out/
  stresswatch replay fixtures/demo_cohort.parquet --out out/ --labels fixtures/demo_cohort_labels.csv --plot
  stresswatch replay a.parquet b.csv --out out/ --consent-db ~/.local/share/stresswatch/stresswatch.sqlite
  stresswatch replay data.parquet --out out/ --set detector.window_s=120
  stresswatch replay data.parquet --out sweep/ --labels labels.csv --set detector.cusum_h=3,4,6
  STRESSWATCH_PSEUDONYM_KEY=secret stresswatch replay data.parquet --out share/ --pseudonymise
"""


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console_err, transient=True
    )


def _pseudonym_key(enabled: bool, key_file: Path | None) -> bytes | None:
    if not enabled:
        return None
    if key_file is not None:
        return key_file.read_bytes().strip()
    env = os.environ.get("STRESSWATCH_PSEUDONYM_KEY")
    if env:
        return env.encode()
    console_err.print(
        "no pseudonym key given (--pseudonym-key-file or STRESSWATCH_PSEUDONYM_KEY): using a random one, "
        "not saved; pseudonyms will differ between runs"
    )
    return secrets.token_bytes(32)


@click.command(epilog=EPILOG)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the output tables.")
@click.option("--kind", help="Adapter kind for all PATHs (default: by file suffix; a samples store folder is read as is).")
@reading_options
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="TOML settings for this replay.")
@click.option("--set", "sets", multiple=True, metavar="KEY=V[,V...]", help="Override a setting; several values run a sweep.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Labelled episodes (user,start,end) to evaluate against.")
@click.option("--plot", is_flag=True, help="Write OUT/plots/USER.png per user.")
@click.option("--speed", type=float, default=0.0, show_default=True, help="0: as fast as possible; X: X times real time.")
@click.option("--consent-db", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Consent ledger marking which alerts would have been sent (default: none consented).")
@click.option("--pseudonymise", is_flag=True, help="Replace user ids by keyed hashes in every output.")
@click.option("--pseudonym-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Key for --pseudonymise (else STRESSWATCH_PSEUDONYM_KEY).")
@pass_app
def replay(
    app: AppContext,
    paths: tuple[Path, ...],
    out: Path,
    kind: str | None,
    config_path: str | None,
    sets: tuple[str, ...],
    labels: Path | None,
    plot: bool,
    speed: float,
    consent_db: Path | None,
    pseudonymise: bool,
    pseudonym_key_file: Path | None,
    tz: str | None,
    maps: tuple[str, ...],
    metric: str | None,
    time_unit: str,
    start_time: str | None,
) -> None:
    """Replay recorded samples through the same pipeline as the live engine.

    PATHs are sample files (Parquet/CSV in the samples schema), a samples store folder
    (what `stresswatch import` wrote: the state dir, or --out of an import), or anything an
    adapter reads (--kind, with --map/--metric/--time-unit/--start-time for a table; a table
    of seconds from the start of a recording needs --start-time). Writes OUT/windows.parquet (one row per user and window), OUT/alerts.parquet
    (every alert raised, with whether consent would have let it through) and
    OUT/summary.json. No one is alerted.
    """
    if plot:  # before any work: a missing extra must not cost a whole replay
        require("matplotlib", extra="plot", feature="replay --plot")
    paths = _expand_store_folders(paths, kind)
    options = source_options(tz, maps, metric, time_unit, start_time)
    if options.keys() - {"time_unit"} and kind is None:
        raise ConfigError("--map, --metric, --tz and --start-time say how an adapter reads a file: name it with --kind (e.g. --kind table)", source="--kind")
    registry = _registry_with(options) if kind is not None else None
    grid = parse_grid(sets)
    single = {k: v[0] for k, v in grid.items() if len(v) == 1}
    multi = {k: v for k, v in grid.items() if len(v) > 1}
    if config_path or single:
        base_overrides = dict(pair.split("=", 1) for pair in app.overrides if "=" in pair)
        settings = load_settings(config_path or app.config_path, overrides={**base_overrides, **single})
    else:
        settings = app.settings
    key = _pseudonym_key(pseudonymise, pseudonym_key_file)
    label_frame = read_labels(labels) if labels else None

    if multi:
        if key is not None or plot:
            raise ConfigError("a sweep writes one table: --plot and --pseudonymise apply to single runs", source="--set")
        samples, report = load_inputs(list(paths), registry, kind=kind)
        with _progress() as bar:
            task = bar.add_task("sweep", total=None)
            table = sweep(samples, settings, multi, labels=label_frame, on_run=lambda i, n: bar.update(task, completed=i, total=n))
        out.mkdir(parents=True, exist_ok=True)
        with atomic_writer(out / "sweep.parquet", mode=0o644, binary=True) as fh:
            table.write_parquet(fh)
        with atomic_writer(out / "sweep.csv", mode=0o644) as fh:
            table.write_csv(fh)
        _print_table(table, "sweep")
        console.print(f"wrote {out / 'sweep.parquet'} and {out / 'sweep.csv'}")
        return

    with _progress() as bar:
        task = bar.add_task("replaying (hours of data)", total=None)
        result = run_replay(
            list(paths),
            out=out,
            settings=settings,
            consent_db=consent_db,
            labels=label_frame,
            pseudonym_key=key,
            speed=speed,
            kind=kind,
            registry=registry,
            on_batch=lambda i, n: bar.update(task, completed=i, total=n),
        )
    s = result.summary
    if result.windows.height and result.windows.get_column("window_start").min().year < 1980:  # type: ignore[union-attr]
        console_err.print(
            "note: windows start in 1970: numeric times were read as times since 1970. For seconds from the start "
            "of a recording, give that start with --start-time (docs/REPLAY.md, lab recordings)",
            soft_wrap=True,
            markup=False,
        )
    dropped = s["inputs"]["dropped"]
    if dropped or s["inputs"]["notes"]:
        console_err.print(
            "input: "
            + "; ".join([*(f"dropped {n} row(s): {why}" for why, n in dropped.items()), *s["inputs"]["notes"]]),
            markup=False,
        )
    consented = f"{s['alerts_consented']} consented" if consent_db is not None else "none counted as consented (no --consent-db given)"
    console.print(
        f"{s['users']} user(s), {s['user_days']:.3g} user-days, {s['windows']:,} windows "
        f"({', '.join(f'{k} {v}' for k, v in s['windows_by_state'].items())}), "
        f"{s['alerts_raised']} alert(s) raised, {consented}"
    )
    if result.evaluation is not None:
        ev = result.evaluation.select(
            "user",
            pl.col("episodes").alias("episodes"),
            pl.col("detected").alias("found"),
            pl.col("alerts"),
            pl.col("false_alerts").alias("false"),
            pl.col("user_days").alias("days"),
            "recall",
            "precision",
            "f1",
            pl.col("false_alerts_per_user_day").alias("false/day"),
            (pl.col("median_delay_s") / 60).alias("delay min"),
        )
        _print_table(ev, "evaluation against labels (after calibration)")
    if plot:
        from ..plot import plot_all

        written = plot_all(
            result.windows,
            result.alerts,
            _maybe_pseudonymised_labels(label_frame, result, key),
            out / "plots",
            baseline_slots=settings.detector.baseline_slots,
            consent_given=consent_db is not None,
        )
        console.print(f"wrote {len(written)} plot(s) to {out / 'plots'}")
    console.print(f"wrote {out / 'windows.parquet'}, {out / 'alerts.parquet'} and {out / 'summary.json'}")


def _expand_store_folders(paths: tuple[Path, ...], kind: str | None) -> tuple[Path, ...]:
    """A samples store folder (``ROOT`` or ``ROOT/samples``, as `import` writes it) stands for
    its part files, which are samples Parquet; other paths are left to the adapters."""
    out: list[Path] = []
    for path in paths:
        parts: list[Path] = []
        if kind is None and path.is_dir():
            base = path / "samples" if (path / "samples").is_dir() else path
            parts = sorted(
                p for p in base.rglob("part-*.parquet") if not any(seg.startswith(".") for seg in p.relative_to(base).parts)
            )
            if not parts:
                raise ParseError("a folder with no samples store in it (no samples/day=YYYY-MM-DD/part-*.parquet): name the adapter with --kind", source=path)
        out.extend(parts or [path])
    return tuple(out)


def _registry_with(options: dict[str, object]) -> SourceRegistry:
    """The installed adapters, each opened with the reading options of the command line."""
    base = SourceRegistry.discover()
    if not options:
        return base

    def bound(factory: object) -> object:
        def open_with(path: Path, **kw: object) -> object:
            return factory(path, **{**options, **kw})  # type: ignore[operator]

        open_with.kind = getattr(factory, "kind", "")  # type: ignore[attr-defined]
        open_with.suffixes = getattr(factory, "suffixes", ())  # type: ignore[attr-defined]
        return open_with

    return SourceRegistry({k: bound(f) for k, f in base.factories.items()}, base.broken)  # type: ignore[misc]


def _maybe_pseudonymised_labels(labels: pl.DataFrame | None, result, key: bytes | None) -> pl.DataFrame | None:  # noqa: ANN001
    if labels is None or key is None:
        return labels
    from ..replay import _pseudonymise, pseudonymiser

    return _pseudonymise(labels, pseudonymiser(key))


def _print_table(frame: pl.DataFrame, title: str) -> None:
    from rich import box

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.3g}"
        return str(v)

    rows = [[fmt(v) for v in row] for row in frame.iter_rows()]
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, col in enumerate(frame.columns):
        width = max([len(col), *(len(r[i]) for r in rows)])
        table.add_column(col, justify="right" if frame.schema[col].is_numeric() else "left", no_wrap=True, min_width=width)
    for r in rows:
        table.add_row(*r)
    console.print(table)
