"""``stresswatch consent``: the service user decides who may be alerted and what they see.

Every command appends to the local ledger and, when a broker is configured (``mqtt.url`` or
``--broker``), publishes the user's whole consent history, retained, on
``{prefix}/consent/{user}`` so the engine records the same events (idempotently).
"""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

import click
from rich.table import Table

from ..alerts.topics import Topics
from ..alerts.transport import MqttTransport
from ..consent.ledger import ConsentLedger
from ..consent.state import CONSENT_TEXT, CONSENT_TEXT_VERSION, ConsentState, QuietHours, Visibility, check_zone
from ..wire.consent import encode_consent
from ..clock import utc_now
from ..errors import ConsentError
from ._common import AppContext, console, console_err, id_option, pass_app

EPILOG = """
\b
Examples:
  stresswatch consent grant --user alice --to sam
  stresswatch consent grant --user alice --to sam --to team-north --show level-and-reasons
  stresswatch consent grant --user alice --to sam --quiet 22:00-07:00 --tz Europe/London --until 2027-01-31
  stresswatch consent pause --user alice
  stresswatch consent revoke --user alice
  stresswatch consent history --user alice
"""

_SHOW = {
    "reach-out": Visibility.REACH_OUT,
    "level-and-reasons": Visibility.LEVEL_AND_REASONS,
    "level-reasons-and-score": Visibility.LEVEL_REASONS_AND_SCORE,
}
_broker_option = click.option("--broker", metavar="URL", help="Publish the change here (default: mqtt.url; none: local ledger only).")


def _ledger(app: AppContext) -> ConsentLedger:
    return ConsentLedger(app.settings.store.db_path)


def _print_state(st: ConsentState, now: datetime | None = None) -> None:
    """One line: who is alerted now, and only that (a revoked consent names no recipient)."""
    now = now or utc_now()
    status = st.status.value
    if status == "none":
        console.print(f"{st.user}: no consent recorded; no one is alerted")
        return
    if status == "revoked":
        console.print(
            f"{st.user}: [bold]revoked[/] since {st.since:%Y-%m-%d %H:%M} UTC; no one is alerted and the engine does not "
            f"process your heart data (to be alerted again: stresswatch consent grant --user {st.user} --to WORKER)"
        )
        return
    if st.expired(now):
        console.print(
            f"{st.user}: [bold]expired[/] at {st.expires_at:%Y-%m-%d %H:%M} UTC; no one is alerted "
            f"(to be alerted again: stresswatch consent grant --user {st.user} --to WORKER)"
        )
        return
    to = ", ".join(st.recipients) or "no one"
    extra = ""
    if st.quiet_hours:
        extra += f"; quiet hours {st.quiet_hours}"
    if st.expires_at:
        extra += f"; until {st.expires_at:%Y-%m-%d %H:%M} UTC"
    if st.timezone:
        extra += f"; your time zone {st.timezone}"
    choice = f"shown as {st.display_name}, who see {st.visibility.value}{extra} (consent text v{st.text_version})"
    if status == "paused":
        console.print(f"{st.user}: [bold]paused[/] since {st.since:%Y-%m-%d %H:%M} UTC; no one is alerted until you resume, then {to}, {choice}")
        return
    console.print(f"{st.user}: [bold]active[/] since {st.since:%Y-%m-%d %H:%M} UTC; alerts go to {to}, {choice}")


def _publish(app: AppContext, ledger: ConsentLedger, user: str, broker: str | None) -> None:
    m = app.settings.mqtt
    url = broker or m.url
    if not url:
        return
    t = MqttTransport(url, client_id=f"stresswatch-companion-{user}", username=m.username, password=m.password, protocol=m.protocol)
    try:
        t.publish(Topics(m.prefix).consent(user), encode_consent(user, ledger.events(user)), qos=1, retain=True)
    finally:
        t.close()  # waits for the broker's PUBACK
    console_err.print(f"sent to the engine via {t.url.split('@')[-1]}")


def _until(text: str | None, now: datetime) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConsentError(f"--until {text!r}: expected a date (2027-01-31) or date and time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    if len(text) == 10:  # a date: consent holds through that whole day
        t = datetime.combine(t.date(), time(), timezone.utc) + timedelta(days=1)
    return t


@click.group(epilog=EPILOG)
def consent() -> None:
    """Grant, pause, resume, revoke and review consent to alerts."""


@consent.command(epilog=EPILOG)
@click.option("--user", required=True, callback=id_option("user"), help="Your user id.")
@click.option("--to", "recipients", multiple=True, required=True, callback=id_option("worker or group"), help="A worker or group who may be alerted, in the order to try them (repeat for more).")
@click.option("--show", type=click.Choice(list(_SHOW)), default="reach-out", show_default=True, help="What they may see (the score only if you choose it).")
@click.option("--as", "display_name", help="The name they see (default: a pseudonym).")
@click.option("--quiet", metavar="HH:MM-HH:MM", help="No alerts during these hours (your time zone); they wait until the end.")
@click.option("--tz", help="Your time zone (IANA), e.g. Europe/London: for --quiet, and for your time-of-day baselines (default: the engine's configured zone; UTC for --quiet).")
@click.option("--until", metavar="DATE", help="Consent ends after this date (or date and time, UTC).")
@click.option("--yes", is_flag=True, help="Agree to the consent text without asking.")
@_broker_option
@pass_app
def grant(
    app: AppContext,
    user: str,
    recipients: tuple[str, ...],
    show: str,
    display_name: str | None,
    quiet: str | None,
    tz: str | None,
    until: str | None,
    yes: bool,
    broker: str | None,
) -> None:
    """Allow alerts about you to reach the workers or groups you name."""
    now = utc_now()
    quiet_hours = QuietHours.parse(quiet, tz or "UTC") if quiet else None
    zone = check_zone(tz) if tz else None
    expires_at = _until(until, now)
    if expires_at is not None and expires_at <= now:  # before the consent text is shown
        raise ConsentError(f"--until {until}: that is in the past ({expires_at:%Y-%m-%d %H:%M} UTC); consent must end in the future")
    groups = app.settings.groups
    for r in recipients:
        if r in groups:
            console.print(f"group {r}: {', '.join(groups[r])}")
    console.print(f"[bold]Consent text v{CONSENT_TEXT_VERSION}[/]\n{CONSENT_TEXT}")
    if not yes:
        click.confirm("Do you agree?", abort=True)
    with _ledger(app) as ledger:
        st = ledger.grant(
            user,
            list(recipients),
            now=now,
            visibility=_SHOW[show],
            display_name=display_name,
            quiet_hours=quiet_hours,
            expires_at=expires_at,
            timezone=zone,
        )
        _print_state(st)
        _publish(app, ledger, user, broker)


def _simple(verb: str, doc: str) -> click.Command:
    @click.option("--user", required=True, callback=id_option("user"), help="Your user id.")
    @_broker_option
    @pass_app
    def command(app: AppContext, user: str, broker: str | None) -> None:
        with _ledger(app) as ledger:
            _print_state(getattr(ledger, verb)(user, now=utc_now()))
            _publish(app, ledger, user, broker)

    command.__doc__ = doc
    return consent.command(name=verb, epilog=EPILOG)(command)


_simple("pause", "Stop alerts for now; resume brings back the same choices.")
_simple("resume", "Resume alerts after a pause.")
_simple("revoke", "Withdraw consent: no alert about you is sent from now on, and the engine stops processing your data.")


@consent.command(epilog=EPILOG)
@click.option("--user", required=True, callback=id_option("user"), help="Your user id.")
@pass_app
def show(app: AppContext, user: str) -> None:
    """Your current consent."""
    with _ledger(app) as ledger:
        _print_state(ledger.state(user))


@consent.command(epilog=EPILOG)
@click.option("--user", required=True, callback=id_option("user"), help="Your user id.")
@pass_app
def history(app: AppContext, user: str) -> None:
    """Every consent change you made, oldest first."""
    with _ledger(app) as ledger:
        table = Table("#", "when (UTC)", "action", "to", "shows", "quiet", "until", "text", "via")
        for ev in ledger.events(user):
            g = ev.action.value == "grant"
            table.add_row(
                str(ev.seq),
                f"{ev.at:%Y-%m-%d %H:%M:%S}",
                ev.action.value,
                ", ".join(ev.recipients),
                ev.visibility.value if g else "",
                str(ev.quiet_hours) if ev.quiet_hours else "",
                f"{ev.expires_at:%Y-%m-%d %H:%M}" if ev.expires_at else "",
                ev.text_version,
                ev.via,
            )
        console.print(table)
