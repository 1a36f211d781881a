"""``stresswatch engine``: the long-running service."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path

import click

from ..broker import EmbeddedBroker
from ..config import load_settings
from ..engine import Engine
from ..mqtt import BrokerAddress
from ._common import AppContext, console_err, pass_app

EPILOG = """
\b
Examples:
  stresswatch engine                                   # first run: embedded broker, default settings
  stresswatch engine --config /etc/stresswatch.toml    # a configured Mosquitto (mqtt.url)
  stresswatch --set mqtt.url=mqtt://127.0.0.1:1883 engine
"""


@click.command(epilog=EPILOG)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), help="TOML settings file (same as the global --config).")
@click.option("--broker", metavar="URL", help="mqtt://HOST:PORT; overrides mqtt.url.")
@click.option("--ingest-broker", metavar="URL", help="The ingest broker; overrides mqtt.ingest_url (unset: --broker carries ingest).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="Overrides store.state_dir.")
@click.option(
    "--broker-conf",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The broker's mosquitto.conf: refuse to start if a listener off loopback allows anonymous clients.",
)
@pass_app
def engine(
    app: AppContext, config_path: str | None, broker: str | None, ingest_broker: str | None, state_dir: Path | None, broker_conf: Path | None
) -> None:
    """Run the engine until SIGTERM or Ctrl-C.

    Receives consenting users' samples on {prefix}/ingest/{user}, runs the detector, sends
    alerts through a durable outbox with the consent gate checked at send time, records
    workers' acks, escalates unacknowledged alerts, and publishes {prefix}/engine/status
    (retained; "offline" as its last will) and {prefix}/status/{user}. With no mqtt.url it
    starts an embedded broker on loopback. It refuses to start against a broker off loopback
    without credentials (and, with --broker-conf, against an anonymous listener off loopback).
    """
    if config_path:
        app.config_path = config_path
    settings = app.settings if not config_path else load_settings(config_path)
    url = broker or settings.mqtt.url
    protocol = settings.mqtt.protocol
    with ExitStack() as stack:
        if url is None:
            embedded = stack.enter_context(EmbeddedBroker(port=_first_run_port()))
            url, protocol = embedded.url, "3.1.1"
            console_err.print(f"embedded MQTT broker on {url} (loopback only; configure mqtt.url for Mosquitto)")
        ingest_url = ingest_broker or settings.mqtt.ingest_url or url
        eng = Engine(settings, url=url, ingest_url=ingest_url, protocol=protocol, state_dir=state_dir, broker_conf=broker_conf).start()
        stop = lambda *_: eng.request_stop()  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        where = str(BrokerAddress.parse(url)) + ("" if ingest_url == url else f" (ingest: {BrokerAddress.parse(ingest_url)})")
        console_err.print(f"engine running on {where}; state in {eng.state_dir} (SIGTERM or Ctrl-C to stop)")
        eng.run()
        console_err.print("engine stopped; state saved")


def _first_run_port() -> int | None:
    """1883 when free (clients find it without configuration), else any free port."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 1883))
        except OSError:
            return None
    return 1883

