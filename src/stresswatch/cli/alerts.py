"""``stresswatch alerts``: the support worker's side (watch, ack, resolve, list)."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from ..wire.acks import AckAction, AckMessage, check_alert_id
from ..alerts.lifecycle import OPEN_STATES, AlertState, LifecycleError, Outcome
from ..alerts.replies import Reply, request
from ..alerts.topics import Topics, check_id
from ..alerts.transport import BrokerAddress
from ..alerts.worker import WorkerClient
from ..errors import ConfigError, TransportError
from ..model import Alert
from ._common import AppContext, console, console_err, id_option, pass_app

EPILOG = """
\b
Examples:
  stresswatch alerts watch --worker sam --broker mqtt://sam:PASSWORD@127.0.0.1:1883
  stresswatch alerts watch --worker sam --count 1      # exit after the first alert
  stresswatch alerts ack 3f2c...e1 --worker sam
  stresswatch alerts resolve 3f2c...e1 --worker sam --outcome reached_out --note "called, all fine"
  stresswatch alerts list --worker sam --open
"""

_broker = click.option("--broker", metavar="URL", help="mqtt://HOST:PORT (default: mqtt.url from settings).")
_worker = click.option("--worker", required=True, callback=id_option("worker"), help="Your worker id: you receive and act only on alerts meant for you.")
_wait = click.option("--timeout-s", "wait_s", type=click.FloatRange(0.1, 600), default=10.0, show_default=True, help="Wait this long for the engine's answer.")


def _url(app: AppContext, broker: str | None) -> str:
    url = broker or app.settings.mqtt.url
    if not url:
        raise ConfigError("no broker: pass --broker or set mqtt.url", field="mqtt.url")
    return url


@click.group(epilog=EPILOG)
def alerts() -> None:
    """Receive, acknowledge and resolve alerts as a support worker."""


@alerts.command(epilog=EPILOG)
@_worker
@_broker
@click.option("--count", type=int, help="Exit after this many alerts.")
@click.option("--timeout-s", type=float, help="Exit after this many seconds.")
@click.option("--seen-file", type=click.Path(dir_okay=False, path_type=Path), help="Where to remember alerts already shown (default: in store.state_dir).")
@pass_app
def watch(app: AppContext, worker: str, broker: str | None, count: int | None, timeout_s: float | None, seen_file: Path | None) -> None:
    """Show alerts for WORKER live, each once, including those sent while you were away.

    The session survives reconnects and restarts of this command (MQTT persistent session);
    alerts already shown are remembered on disk, so a re-sent alert is not shown twice.
    If the broker stops accepting the account (removed, password changed), it says
    "not authorised" and exits with status 77.

    Your account: in the URL (mqtt://sam:PASSWORD@HOST:1883), or mqtt.username with
    mqtt.password or mqtt.password_file (environment: STRESSWATCH_MQTT__USERNAME,
    STRESSWATCH_MQTT__PASSWORD, STRESSWATCH_MQTT__PASSWORD_FILE). See docs/ALERTS.md.
    """
    s = app.settings.mqtt
    url = _url(app, broker)
    check_id("worker", worker)
    done = threading.Event()
    refused: list[str] = []
    n = 0

    def on_refused(reason: str) -> None:
        refused.append(reason)
        done.set()

    def on_alert(alert: Alert) -> None:
        nonlocal n
        n += 1
        detail = f" level={alert.level.value}" if alert.level else ""
        detail += f" reasons={','.join(r.value for r in alert.reasons)}" if alert.reasons else ""
        detail += f" score={alert.score:g}" if alert.score is not None else ""
        detail += f' note="{alert.note}"' if alert.note else ""  # a check-in: the person's own words
        console.print(f"{alert.raised_at:%Y-%m-%d %H:%M} UTC  reach out to {alert.user}{detail}  id={alert.alert_id}", markup=False)
        if count is not None and n >= count:
            done.set()

    def on_reminder(alert: Alert) -> None:
        console.print(f"reminder #{alert.notice}: still unacknowledged: reach out to {alert.user}  id={alert.alert_id}", markup=False)

    client = WorkerClient(
        url,
        worker,
        on_alert,
        topics=Topics(s.prefix),
        username=s.username,
        password=s.password,
        protocol=s.protocol,
        on_invalid=lambda topic, why: console_err.print(f"ignored an invalid message on {topic}: {why}", markup=False),
        on_reminder=on_reminder,
        on_connection=lambda up: refused or console_err.print("connected again" if up else "connection lost; reconnecting..."),
        on_refused=on_refused,
        seen_path=seen_file or app.settings.store.state_dir / f"worker-{worker}-seen.sqlite",
    )
    console_err.print(f"watching alerts for {worker} (Ctrl-C to stop)")
    try:
        done.wait(timeout_s)
    finally:
        client.close()
    if refused:
        raise AccountRefused(
            f"not authorised: the broker refused {worker}'s account when it connected again ({refused[0]}): the account was removed "
            "or its password changed; ask the operator, then pass the new password",
            url=str(BrokerAddress.parse(url)),
        )


class AccountRefused(TransportError):
    """The broker stopped accepting the worker's account while watching."""

    exit_code = 77  # EX_NOPERM


def _worker_account(app: AppContext, worker: str) -> None:
    """The broker account acts for one worker: refuse a --worker that is not the account's."""
    check_id("worker", worker)
    account = app.settings.mqtt.username
    if account and account != worker:
        raise ConfigError(
            f"--worker {worker} but the broker account is {account!r}: a worker acts only on its own alerts"
            f" (sign in as {worker}, or pass --worker {account})",
            field="--worker",
        )


def _request(app: AppContext, broker: str | None, worker: str, msg: AckMessage, wait_s: float) -> Reply:
    s = app.settings.mqtt
    _worker_account(app, worker)
    return request(
        _url(app, broker), worker, msg, topics=Topics(s.prefix), username=s.username, password=s.password, protocol=s.protocol, timeout_s=wait_s
    )


def _alert_id(value: str) -> str:
    try:
        return check_alert_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ALERT_ID") from None


def _recorded(reply: Reply) -> None:
    """Print what the engine recorded; an error exit if it recorded nothing."""
    if not reply.ok:
        now = f" (the alert is {reply.alert.state.value})" if reply.alert else ""
        raise LifecycleError(f"{reply.error}{now}")
    assert reply.alert is not None
    a = reply.alert
    if a.state is AlertState.RESOLVED:
        console.print(f"the engine recorded {a.alert_id}: resolved by {a.resolved_by} ({a.outcome.value if a.outcome else '?'})", markup=False)
    else:
        console.print(f"the engine recorded {a.alert_id}: {a.state.value} by {a.acked_by}", markup=False)


@alerts.command(epilog=EPILOG)
@click.argument("alert_id")
@_worker
@_broker
@_wait
@pass_app
def ack(app: AppContext, alert_id: str, worker: str, broker: str | None, wait_s: float) -> None:
    """Acknowledge ALERT_ID: "I'm reaching out" (stops escalation to others).

    Prints what the engine recorded, and exits non-zero if it recorded nothing (not your
    alert, already acknowledged, no answer from the engine).
    """
    _recorded(_request(app, broker, worker, AckMessage(alert_id=_alert_id(alert_id), action=AckAction.ACK), wait_s))


@alerts.command(epilog=EPILOG)
@click.argument("alert_id")
@_worker
@_broker
@click.option("--outcome", required=True, type=click.Choice([o.value for o in Outcome]), help="What happened.")
@click.option("--note", help="A short note for the record (no health details, please).")
@_wait
@pass_app
def resolve(app: AppContext, alert_id: str, worker: str, broker: str | None, outcome: str, note: str | None, wait_s: float) -> None:
    """Resolve ALERT_ID with an outcome; prints what the engine recorded."""
    msg = AckMessage(alert_id=_alert_id(alert_id), action=AckAction.RESOLVE, outcome=Outcome(outcome), note=note)
    _recorded(_request(app, broker, worker, msg, wait_s))


@alerts.command("list", epilog=EPILOG)
@_worker
@_broker
@click.option("--open", "open_only", is_flag=True, help="Only alerts still waiting for someone (raised, delivered, escalated).")
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in AlertState]), help="Only alerts in this state (repeatable).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="At most this many, newest first.")
@_wait
@pass_app
def list_(app: AppContext, worker: str, broker: str | None, open_only: bool, states: tuple[str, ...], limit: int, wait_s: float) -> None:
    """Your alerts as the engine recorded them (newest first), with their ids.

    The engine answers from its outbox: only alerts sent to you (or to a group you are in).
    """
    wanted = [AlertState(s) for s in states] + (list(OPEN_STATES) if open_only else [])
    reply = _request(app, broker, worker, AckMessage(action=AckAction.LIST, states=wanted or None, limit=limit), wait_s)
    if not reply.ok:
        raise LifecycleError(reply.error or "the engine refused the request")
    rows = reply.alerts or []
    if not rows:
        console.print("no alerts" + (" open" if open_only else ""), markup=False)
        return
    for a in rows:
        detail = f" level={a.level.value}" if a.level else ""
        detail += f" reasons={','.join(r.value for r in a.reasons)}" if a.reasons else ""
        when = f" escalates {a.escalation_due_at:%Y-%m-%d %H:%M} UTC" if a.escalation_due_at else ""
        who = f" by {a.resolved_by or a.acked_by}" if (a.resolved_by or a.acked_by) else ""
        outcome = f" ({a.outcome.value})" if a.outcome else ""
        console.print(
            f"{a.raised_at:%Y-%m-%d %H:%M} UTC  {a.state.value:<12} {a.user}{detail}{who}{outcome}{when}  id={a.alert_id}",
            markup=False,
        )
