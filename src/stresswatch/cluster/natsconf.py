"""A NATS node's configuration for companions on NATS's own MQTT listener (pure).

With ``cluster.companions = "nats-mqtt"`` companions (and workers) connect to nats-server's
MQTT listener instead of Mosquitto; no bridge runs. The server converts an MQTT topic into a
NATS subject (``/`` -> ``.``), and two subject mappings of this configuration put what
companions publish where the engines read it:

* ``{prefix}.ingest.*`` -> ``<name>.ingest.{{partition(P,1)}}.{{wildcard(1)}}``: the batch
  lands in the ingest stream on its user's partition (NATS's ``partition()`` is FNV-1a of the
  token modulo P, the same as :func:`.layout.partition_of`), with the user as the last token,
  which the engine checks against the payload's user as it checks a topic's user;
* ``{prefix}.consent.*`` -> ``$KV.<name>_consent.{{wildcard(1)}}``: the user's consent message
  is a put into the consent bucket every engine watches.

Limits of nats-server 2.9 that this path inherits (docs/CLUSTER.md, "Companions' path"): MQTT
3.1.1 only, QoS 0 and 1, and a topic with a ``.`` is refused, so user ids containing a dot
(allowed by our id grammar, ``wire/ids.py``) cannot publish on this path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .layout import Layout


def topic_subject(topic: str) -> str:
    """The NATS subject nats-server gives an MQTT topic without dots (``a/b`` -> ``a.b``)."""
    if "." in topic or " " in topic:
        raise ValueError("nats-server 2.9 refuses MQTT topics with '.' or ' '")
    return topic.replace("/", ".")


def mqtt_mappings(layout: Layout, prefix: str) -> dict[str, str]:
    """Subject mappings from the companions' MQTT topics into the cluster's stream and bucket."""
    if not layout.user_token:
        raise ValueError("the MQTT listener's mapping needs a layout with the user token (cluster.companions = 'nats-mqtt')")
    root = topic_subject(prefix)
    return {
        f"{root}.ingest.*": f"{layout.subject_root}.{{{{partition({layout.partitions},1)}}}}.{{{{wildcard(1)}}}}",
        f"{root}.consent.*": f"$KV.{layout.consent}.{{{{wildcard(1)}}}}",
    }


@dataclass(frozen=True)
class NodeConf:
    """One nats-server: client and MQTT listeners, its JetStream store, and (``routes``) the
    cluster it belongs to; an empty ``routes`` is a single node."""

    server_name: str
    listen: str  # host:port for NATS clients (engines)
    mqtt_listen: str | None  # host:port for MQTT clients (companions, workers); None: no listener
    store_dir: Path
    cluster_listen: str | None = None
    routes: tuple[str, ...] = ()
    cluster_name: str = "stresswatch"


def node_conf(node: NodeConf, layout: Layout, prefix: str = "stresswatch/v1") -> str:
    """The node's configuration text (``nats-server -c``). The MQTT listener needs JetStream and
    a server name (it keeps MQTT sessions and retained messages in streams of its own)."""
    lines = [f"server_name: {node.server_name}", f"listen: {node.listen}", f'jetstream {{\n  store_dir: "{node.store_dir}"\n}}']
    if node.cluster_listen is not None and node.routes:
        routes = ", ".join(f"nats-route://{r}" for r in node.routes)
        lines.append(f"cluster {{\n  name: {node.cluster_name}\n  listen: {node.cluster_listen}\n  routes: [{routes}]\n}}")
    if node.mqtt_listen is not None:
        lines.append(f"mqtt {{\n  listen: {node.mqtt_listen}\n}}")
        maps = "\n".join(f'  "{src}": "{dst}"' for src, dst in mqtt_mappings(layout, prefix).items())
        lines.append(f"mappings = {{\n{maps}\n}}")
    return "\n".join(lines) + "\n"


__all__ = ["NodeConf", "mqtt_mappings", "node_conf", "topic_subject"]
