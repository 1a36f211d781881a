"""``stresswatch cluster ...``: operating the cluster mode (docs/CLUSTER.md)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click
from rich.table import Table

from ._common import AppContext, console, pass_app

EPILOG = """
\b
Examples:
  stresswatch cluster status --cluster nats://n1:4222,nats://n2:4222,nats://n3:4222
  stresswatch cluster status --cluster nats://127.0.0.1:4222 --json
  stresswatch cluster bridge --cluster nats://n1:4222,nats://n2:4222 --broker mqtt://mq:1883
  stresswatch cluster nats-conf --server-name n1 --listen 0.0.0.0:4222 --mqtt 0.0.0.0:1883 --store /var/lib/nats
"""

servers_option = click.option("--cluster", "servers", metavar="URLS", required=True, help="nats://host:port[,...] of the cluster's NATS servers.")


@click.group(epilog=EPILOG)
def cluster() -> None:
    """Cluster mode: users partitioned over engine processes on NATS JetStream."""


@cluster.command(epilog=EPILOG)
@servers_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (partitions, engines) instead of a table.")
@pass_app
def status(app: AppContext, servers: str, as_json: bool) -> None:
    """Partitions, their owners and lease time left, lag (messages not yet acknowledged by the
    owner), and each partition's last snapshot (sequence, age, size)."""
    from ..cluster.jetstream import JetStreamIO
    from ..cluster.layout import Layout
    from ..cluster.status import read_status

    c = app.settings.cluster
    layout = Layout.of(c)
    jsio = JetStreamIO(split_servers(servers), layout, name="stresswatch-cluster-status")
    try:
        rows, engines = read_status(jsio, layout, time.time())
    finally:
        jsio.close()
    if as_json:
        click.echo(json.dumps({"engines": engines, "partitions": [asdict(r) | {"snapshot_lag": r.snapshot_lag} for r in rows]}))
        return
    t = Table(title=f"cluster {c.name}: {c.partitions} partitions, live engines: {', '.join(engines) or 'none'}")
    for col in ("partition", "owner", "lease left", "last seq", "lag", "snapshot seq", "snapshot age", "snapshot size", "since snapshot"):
        t.add_column(col, justify="right" if col != "owner" else "left")
    for r in rows:
        t.add_row(
            str(r.partition),
            r.owner or "[red]none[/red]",
            _num(r.lease_left_s, "{:.1f} s"),
            str(r.last_seq),
            _num(r.pending, "{}"),
            _num(r.snapshot_seq, "{}"),
            _num(r.snapshot_age_s, "{:.0f} s"),
            _num(r.snapshot_bytes, "{:,} B"),
            _num(r.snapshot_lag, "{}"),
        )
    console.print(t)


@cluster.command(epilog=EPILOG)
@servers_option
@click.option("--broker", metavar="URL", help="The companions' MQTT broker (mqtt://HOST:PORT); overrides mqtt.url.")
@pass_app
def bridge(app: AppContext, servers: str, broker: str | None) -> None:
    """Forward companions' ingest and consent from the MQTT broker into the cluster: a batch is
    acknowledged to its companion only once JetStream has stored it. Runs until SIGTERM."""
    import signal
    import threading

    from ..cluster.bridge import Bridge
    from ._common import console_err

    url = broker or app.settings.mqtt.url
    if url is None:
        raise click.UsageError("the bridge needs the companions' broker: --broker mqtt://HOST:PORT or mqtt.url")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    b = Bridge(app.settings, mqtt_url=url, servers=split_servers(servers)).start()
    console_err.print(f"bridge {url} -> cluster {app.settings.cluster.name} running (SIGTERM or Ctrl-C to stop)")
    try:
        stop.wait()
    finally:
        b.close()
    console_err.print(f"bridge stopped: {b.forwarded} batches and {b.consents} consent messages forwarded")


@cluster.command("nats-conf", epilog=EPILOG)
@click.option("--server-name", required=True, help="This node's unique name.")
@click.option("--listen", default="0.0.0.0:4222", show_default=True, help="host:port for NATS clients (the engines).")
@click.option("--mqtt", "mqtt_listen", default="0.0.0.0:1883", show_default=True, help="host:port of NATS's MQTT listener (companions, workers); 'none' for no listener.")
@click.option("--store", type=click.Path(), required=True, help="JetStream's store directory.")
@click.option("--cluster-listen", help="host:port for routes between the nodes (omit for a single node).")
@click.option("--route", "routes", multiple=True, help="host:port of every node's route listener, this one included (repeat).")
@pass_app
def nats_conf(app: AppContext, server_name: str, listen: str, mqtt_listen: str, store: str, cluster_listen: str | None, routes: tuple[str, ...]) -> None:
    """Print a nats-server configuration with the subject mappings that put batches published
    on NATS's own MQTT listener into the cluster's partitions (cluster.companions = "nats-mqtt")."""
    from pathlib import Path

    from ..cluster.layout import Layout
    from ..cluster.natsconf import NodeConf, node_conf

    c = app.settings.cluster
    if c.companions != "nats-mqtt" and mqtt_listen != "none":
        raise click.UsageError('the MQTT listener path needs cluster.companions = "nats-mqtt" in the configuration (engines read the user from the subject)')
    node = NodeConf(server_name, listen, None if mqtt_listen == "none" else mqtt_listen, Path(store), cluster_listen, tuple(routes))
    click.echo(node_conf(node, Layout.of(c), app.settings.mqtt.prefix), nl=False)


def split_servers(servers: str) -> list[str]:
    return [s.strip() for s in servers.split(",") if s.strip()]


def _num(v: float | int | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


__all__ = ["cluster", "split_servers"]
