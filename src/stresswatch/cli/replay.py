"""``stresswatch replay``: recorded samples through the live pipeline, Parquet out."""

from __future__ import annotations

from pathlib import Path

import click

from ..replay import replay as run_replay
from ._common import AppContext, console, pass_app

EPILOG = """
\b
Examples:
  stresswatch replay fixtures/demo_cohort.parquet --out out/
  stresswatch replay a.parquet b.csv --out out/ --consent-db ~/.local/share/stresswatch/stresswatch.sqlite
  stresswatch --set detector.window_s=120 replay data.parquet --out out/
"""


@click.command(epilog=EPILOG)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for windows.parquet and alerts.parquet.")
@click.option("--consent-db", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Consent ledger to mark which alerts would have been sent (default: none consented).")
@pass_app
def replay(app: AppContext, paths: tuple[Path, ...], out: Path, consent_db: Path | None) -> None:
    """Replay sample files (Parquet/CSV in the samples schema) through the detector.

    Writes one row per user and window to OUT/windows.parquet and every alert the detector
    raised to OUT/alerts.parquet, with whether consent would have let it through. No one
    is alerted.
    """
    result = run_replay(list(paths), out=out, settings=app.settings, consent_db=consent_db)
    states = result.windows.group_by("state").len().sort("state")
    console.print(
        f"{len(result.report.users)} user(s), {result.windows.height:,} windows "
        f"({', '.join(f'{s} {n}' for s, n in states.iter_rows())}), {result.alerts.height} alert(s) raised, "
        f"{int(result.alerts.get_column('sent').sum())} consented"
    )
    console.print(f"wrote {out / 'windows.parquet'} and {out / 'alerts.parquet'}")
