"""``stresswatch consent``: the service user decides who may be alerted and what they see."""

from __future__ import annotations

import click
from rich.table import Table

from ..consent.ledger import ConsentLedger
from ..consent.state import CONSENT_TEXT, CONSENT_TEXT_VERSION, ConsentState, Visibility
from ..engine import utc_now
from ._common import AppContext, console, pass_app

EPILOG = """
\b
Examples:
  stresswatch consent grant --user alice --to sam
  stresswatch consent grant --user alice --to sam --to team-north --show level-and-reasons
  stresswatch consent pause --user alice
  stresswatch consent revoke --user alice
  stresswatch consent history --user alice
"""

_SHOW = {"reach-out": Visibility.REACH_OUT, "level-and-reasons": Visibility.LEVEL_AND_REASONS}


def _ledger(app: AppContext) -> ConsentLedger:
    return ConsentLedger(app.settings.store.db_path)


def _print_state(st: ConsentState) -> None:
    if st.status.value == "none":
        console.print(f"{st.user}: no consent recorded; no one is alerted")
        return
    to = ", ".join(st.recipients) or "no one"
    console.print(
        f"{st.user}: [bold]{st.status.value}[/] since {st.since:%Y-%m-%d %H:%M} UTC; alerts go to {to}, "
        f"shown as {st.display_name}, who see {st.visibility.value} (consent text v{st.text_version})"
    )


@click.group(epilog=EPILOG)
def consent() -> None:
    """Grant, pause, resume, revoke and review consent to alerts."""


@consent.command(epilog=EPILOG)
@click.option("--user", required=True, help="Your user id.")
@click.option("--to", "recipients", multiple=True, required=True, help="A worker or group who may be alerted (repeat for more).")
@click.option("--show", type=click.Choice(list(_SHOW)), default="reach-out", show_default=True, help="What they may see.")
@click.option("--as", "display_name", help="The name they see (default: a pseudonym).")
@click.option("--yes", is_flag=True, help="Agree to the consent text without asking.")
@pass_app
def grant(app: AppContext, user: str, recipients: tuple[str, ...], show: str, display_name: str | None, yes: bool) -> None:
    """Allow alerts about you to reach the workers you name."""
    console.print(f"[bold]Consent text v{CONSENT_TEXT_VERSION}[/]\n{CONSENT_TEXT}")
    if not yes:
        click.confirm("Do you agree?", abort=True)
    with _ledger(app) as ledger:
        _print_state(ledger.grant(user, list(recipients), now=utc_now(), visibility=_SHOW[show], display_name=display_name))


def _simple(verb: str, doc: str) -> click.Command:
    @click.option("--user", required=True, help="Your user id.")
    @pass_app
    def command(app: AppContext, user: str) -> None:
        with _ledger(app) as ledger:
            _print_state(getattr(ledger, verb)(user, now=utc_now()))

    command.__doc__ = doc
    return consent.command(name=verb, epilog=EPILOG)(command)


_simple("pause", "Stop alerts for now; resume brings back the same choices.")
_simple("resume", "Resume alerts after a pause.")
_simple("revoke", "Withdraw consent: no alert about you is sent from now on.")


@consent.command(epilog=EPILOG)
@click.option("--user", required=True, help="Your user id.")
@pass_app
def show(app: AppContext, user: str) -> None:
    """Your current consent."""
    with _ledger(app) as ledger:
        _print_state(ledger.state(user))


@consent.command(epilog=EPILOG)
@click.option("--user", required=True, help="Your user id.")
@pass_app
def history(app: AppContext, user: str) -> None:
    """Every consent change you made, oldest first."""
    with _ledger(app) as ledger:
        table = Table("#", "when (UTC)", "action", "to", "shows", "text", "via")
        for ev in ledger.events(user):
            table.add_row(
                str(ev.seq), f"{ev.at:%Y-%m-%d %H:%M:%S}", ev.action.value, ", ".join(ev.recipients), ev.visibility.value if ev.action.value == "grant" else "", ev.text_version, ev.via
            )
        console.print(table)
