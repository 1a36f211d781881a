"""``stresswatch export``: everything the project keeps about one user, as JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..alerts.outbox import Outbox
from ..consent.ledger import ConsentLedger
from ..consent.rights import export_user
from ..fsio import atomic_writer
from ..clock import utc_now
from ..store import SampleStore
from ._common import AppContext, console_err, id_option, pass_app

EPILOG = """
\b
Examples:
  stresswatch export --user alice --out alice-export.json
  stresswatch export --user alice > alice-export.json
"""


@click.command(epilog=EPILOG)
@click.option("--user", required=True, callback=id_option("user"), help="Whose data to export.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here (atomically) instead of stdout.")
@pass_app
def export(app: AppContext, user: str, out: Path | None) -> None:
    """Export a user's data: consent history (with the consent texts agreed to), alert
    history (each alert's lifecycle) and samples as Open mHealth JSON data points."""
    state_dir = app.settings.store.state_dir
    with ConsentLedger(app.settings.store.db_path) as ledger, Outbox(app.settings.store.db_path) as outbox:
        store = SampleStore(state_dir)
        now = utc_now()

        def write(fh: object) -> dict[str, int]:
            return export_user(user, fh, ledger=ledger, outbox=outbox, store=store, now=now)  # type: ignore[arg-type]

        if out is None:
            counts = write(sys.stdout)
        else:
            with atomic_writer(out) as fh:
                counts = write(fh)
    where = f" to {out}" if out else ""
    console_err.print(
        f"exported {counts['consent_events']} consent event(s), {counts['alerts']} alert(s) and {counts['samples']:,} sample(s){where}"
    )
