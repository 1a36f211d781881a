"""``stresswatch alerts``: the support worker's side."""

from __future__ import annotations

import threading

import click

from ..alerts.topics import Topics
from ..alerts.worker import WorkerClient
from ..errors import ConfigError
from ..model import Alert
from ._common import AppContext, console, console_err, pass_app

EPILOG = """
\b
Examples:
  stresswatch alerts watch --worker sam --broker mqtt://127.0.0.1:1883
  stresswatch alerts watch --worker sam --count 1      # exit after the first alert
"""


@click.group(epilog=EPILOG)
def alerts() -> None:
    """Receive alerts as a support worker."""


@alerts.command(epilog=EPILOG)
@click.option("--worker", required=True, help="Your worker id: you receive only the alerts meant for you.")
@click.option("--broker", metavar="URL", help="mqtt://HOST:PORT (default: mqtt.url from settings).")
@click.option("--count", type=int, help="Exit after this many alerts.")
@click.option("--timeout-s", type=float, help="Exit after this many seconds.")
@pass_app
def watch(app: AppContext, worker: str, broker: str | None, count: int | None, timeout_s: float | None) -> None:
    """Show alerts for WORKER live, each once, including those sent while you were away."""
    s = app.settings.mqtt
    url = broker or s.url
    if not url:
        raise ConfigError("no broker: pass --broker or set mqtt.url", field="mqtt.url")
    done = threading.Event()
    n = 0

    def on_alert(alert: Alert) -> None:
        nonlocal n
        n += 1
        detail = f" level={alert.level.value}" if alert.level else ""
        detail += f" reasons={','.join(r.value for r in alert.reasons)}" if alert.reasons else ""
        console.print(f"{alert.raised_at:%Y-%m-%d %H:%M} UTC  reach out to {alert.user}{detail}  id={alert.alert_id}")
        if count is not None and n >= count:
            done.set()

    client = WorkerClient(
        url,
        worker,
        on_alert,
        topics=Topics(s.prefix),
        username=s.username,
        password=s.password,
        protocol=s.protocol,
        on_invalid=lambda topic, why: console_err.print(f"ignored an invalid message on {topic}: {why}", markup=False),
    )
    console_err.print(f"watching alerts for {worker} (Ctrl-C to stop)")
    try:
        done.wait(timeout_s)
    finally:
        client.close()
