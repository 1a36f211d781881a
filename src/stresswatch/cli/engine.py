"""``stresswatch engine``: the long-running service."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..broker import EmbeddedBroker
from ..config import Settings, load_settings
from ..engine import Engine
from ..mqtt import BrokerAddress
from ._common import AppContext, console_err, pass_app

if TYPE_CHECKING:
    from ..cluster.engine import ClusterEngine

EPILOG = """
\b
Examples:
  stresswatch engine                                   # first run: embedded broker, default settings
  stresswatch engine --config /etc/stresswatch.toml    # a configured Mosquitto (mqtt.url)
  stresswatch --set mqtt.url=mqtt://127.0.0.1:1883 engine
  stresswatch engine --cluster nats://n1:4222,nats://n2:4222,nats://n3:4222 --broker mqtt://mq:1883
                                                       # one of K partitioned engines (docs/CLUSTER.md)
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
@click.option("--cluster", "cluster", metavar="URLS", help="nats://host:port[,...]: run as one engine of a cluster on NATS JetStream (docs/CLUSTER.md).")
@click.option("--engine-id", help="With --cluster: this engine's name in leases and status (default host-pid).")
@click.option("--publish-windows", is_flag=True, help="With --cluster: also publish every finished window to sw.windows.<partition>.")
@pass_app
def engine(
    app: AppContext,
    config_path: str | None,
    broker: str | None,
    ingest_broker: str | None,
    state_dir: Path | None,
    broker_conf: Path | None,
    cluster: str | None,
    engine_id: str | None,
    publish_windows: bool,
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
    if cluster:
        _run_cluster(settings, cluster, url, state_dir, engine_id, publish_windows)
        return
    with ExitStack() as stack:
        if url is None:
            embedded = stack.enter_context(EmbeddedBroker(port=_first_run_port()))
            url, protocol = embedded.url, "3.1.1"
            console_err.print(f"embedded MQTT broker on {url} (loopback only; configure mqtt.url for Mosquitto)")
        ingest_url = ingest_broker or settings.mqtt.ingest_url or url
        eng = Engine(settings, url=url, ingest_url=ingest_url, protocol=protocol, state_dir=state_dir, broker_conf=broker_conf).start()
        where = str(BrokerAddress.parse(url)) + ("" if ingest_url == url else f" (ingest: {BrokerAddress.parse(ingest_url)})")
        _run_until_signal(eng, f"engine running on {where}; state in {eng.state_dir}", "engine stopped; state saved")


def _run_until_signal(eng: Engine | ClusterEngine, running: str, stopped: str) -> None:
    stop = lambda *_: eng.request_stop()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    console_err.print(f"{running} (SIGTERM or Ctrl-C to stop)")
    eng.run()
    console_err.print(stopped)


def _run_cluster(
    settings: Settings, servers: str, url: str | None, state_dir: Path | None, engine_id: str | None, publish_windows: bool
) -> None:
    from ..cluster.engine import ClusterEngine  # noqa: F811 - nats-py only when asked for
    from .cluster import split_servers

    if url is None:
        raise click.UsageError("--cluster needs the alerts broker: --broker mqtt://HOST:PORT or mqtt.url")
    eng = ClusterEngine(
        settings,
        servers=split_servers(servers),
        mqtt_url=url,
        engine_id=engine_id,
        work_dir=(state_dir / "cluster") if state_dir else None,
        publish_windows=publish_windows,
    ).start()
    running = f"cluster engine {eng.engine_id} running; {settings.cluster.partitions} partitions"
    _run_until_signal(eng, running, "cluster engine stopped; partitions saved and released")


def _first_run_port() -> int | None:
    """1883 when free (clients find it without configuration), else any free port."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 1883))
        except OSError:
            return None
    return 1883

