"""``stresswatch alerts``: the support worker's side (watch, ack, resolve)."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from ..alerts.acks import AckAction, AckMessage
from ..alerts.lifecycle import Outcome
from ..alerts.topics import Topics, check_id
from ..alerts.worker import WorkerClient, send_ack
from ..alerts.transport import BrokerAddress
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
"""

_broker = click.option("--broker", metavar="URL", help="mqtt://HOST:PORT (default: mqtt.url from settings).")
_worker = click.option("--worker", required=True, callback=id_option("worker"), help="Your worker id: you receive and act only on alerts meant for you.")


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


def _send(app: AppContext, broker: str | None, worker: str, msg: AckMessage) -> None:
    s = app.settings.mqtt
    check_id("worker", worker)
    send_ack(_url(app, broker), worker, msg, topics=Topics(s.prefix), username=s.username, password=s.password, protocol=s.protocol)


@alerts.command(epilog=EPILOG)
@click.argument("alert_id")
@_worker
@_broker
@pass_app
def ack(app: AppContext, alert_id: str, worker: str, broker: str | None) -> None:
    """Acknowledge ALERT_ID: "I'm reaching out" (stops escalation to others)."""
    _send(app, broker, worker, AckMessage(alert_id=alert_id, action=AckAction.ACK))
    console.print(f"acknowledged {alert_id}")


@alerts.command(epilog=EPILOG)
@click.argument("alert_id")
@_worker
@_broker
@click.option("--outcome", required=True, type=click.Choice([o.value for o in Outcome]), help="What happened.")
@click.option("--note", help="A short note for the record (no health details, please).")
@pass_app
def resolve(app: AppContext, alert_id: str, worker: str, broker: str | None, outcome: str, note: str | None) -> None:
    """Resolve ALERT_ID with an outcome."""
    _send(app, broker, worker, AckMessage(alert_id=alert_id, action=AckAction.RESOLVE, outcome=Outcome(outcome), note=note))
    console.print(f"resolved {alert_id}: {outcome}")
