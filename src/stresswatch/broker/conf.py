"""Mosquitto configuration rendering (pure: text in, text out): :func:`mosquitto_conf` writes
the settings measured to matter, :func:`render_acl` the access rules of SPEC's topic table.
docs/BROKER.md explains the choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from ..wire.limits import MAX_PAYLOAD_BYTES
from .accounts import Role, check_account_id


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener from certificates the operator supplies (paths as mosquitto reads them)."""

    port: int
    cert: Path
    key: Path
    ca: Path
    host: str = "127.0.0.1"


# Fixed header, topic (prefix + level + id) and MQTT 5 properties of one PUBLISH around its payload.
PACKET_OVERHEAD_BYTES = 64 * 1024

BrokerRole = Literal["alerts", "ingest"]
# The ingest broker's store is saved this often (and at a clean shutdown). Nothing acknowledged
# to a companion depends on it: a companion keeps each batch until the engine confirms it is in
# its ingest log (docs/BROKER.md, "Two brokers"). The saves keep the engine's session (and the
# batches queued for it) across a broker restart, so that companions need not re-send them.
INGEST_AUTOSAVE_S = 60


def mosquitto_conf(
    *,
    port: int,
    data_dir: Path,
    host: str = "127.0.0.1",
    allow_anonymous: bool = False,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    run_as: str | None = None,
    tls: TlsListener | None = None,
    plaintext: bool = True,
    max_packet_size_bytes: int = MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES,
    role: BrokerRole = "alerts",
) -> str:
    """A mosquitto.conf for our broker. The limits are deliberate (SPEC "broker facts"):

    * ``max_queued_messages 0`` (unlimited): the default 1000 dropped 15 % of a QoS 1 stream
      to a subscriber that fell behind;
    * ``autosave_on_changes`` with ``autosave_interval 1``: default persistence lost every
      queued message on SIGKILL;
    * ``persistent_client_expiration``: offline workers keep their queue for a week;
    * ``message_size_limit`` = the largest legitimate payload of any message
      (:data:`stresswatch.wire.limits.MAX_PAYLOAD_BYTES`, computed from the message caps; see
      docs/BROKER.md): a larger publish is refused, neither forwarded nor retained;
      ``max_packet_size`` (``max_packet_size_bytes``) a little above it disconnects a client
      sending far more.

    ``tls`` adds a TLS listener (TLS 1.2 or later); ``plaintext=False`` leaves it the only one.

    ``role="ingest"``: the broker for ``ingest/+`` and the engine's ``ingested/+`` confirmations
    only, which saves its store every :data:`INGEST_AUTOSAVE_S` seconds instead of after every
    change: saving after every change caps a broker near 300 QoS 1 messages/s on this machine
    (benchmarks/RESULTS.md), while the durability of ingest is the companion's buffer plus the
    engine's ingest log (docs/BROKER.md).
    """
    if role not in ("alerts", "ingest"):
        raise ConfigError(f"unknown broker role {role!r}: alerts or ingest", field="role")
    if not plaintext and tls is None:
        raise ConfigError("a broker needs at least one listener: keep the plaintext one or give TLS certificates")
    lines = [
        f"# Written by stresswatch: the {'alerts-and-consent' if role == 'alerts' else 'ingest'} broker. See docs/BROKER.md.",
        "per_listener_settings false",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "persistence true",
        f"persistence_location {data_dir}/",
        *(["autosave_on_changes true", "autosave_interval 1"] if role == "alerts" else ["autosave_on_changes false", f"autosave_interval {INGEST_AUTOSAVE_S}"]),
        "max_queued_messages 0",
        "max_inflight_messages 100",
        "persistent_client_expiration 7d",
        f"message_size_limit {MAX_PAYLOAD_BYTES}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    if max_packet_size_bytes < 20:  # mosquitto refuses smaller values (a CONNECT needs more)
        raise ConfigError("max_packet_size_bytes must be at least 20", field="max_packet_size_bytes")
    lines.insert(lines.index("log_dest stderr"), f"max_packet_size {max_packet_size_bytes}")
    if run_as:
        lines.append(f"user {run_as}")
    if password_file:
        lines.append(f"password_file {password_file}")
    if acl_file:
        lines.append(f"acl_file {acl_file}")
    if plaintext:
        lines += ["", f"listener {port} {host}"]
    if tls is not None:
        lines += [
            "",
            f"listener {tls.port} {tls.host}",
            f"cafile {tls.ca}",
            f"certfile {tls.cert}",
            f"keyfile {tls.key}",
            "tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n"


def render_acl(prefix: str, accounts: Mapping[str, Role]) -> str:
    """Mosquitto's default ACL for SPEC's topic table.

    ``pattern`` lines apply to every authenticated account with ``%u`` replaced by its
    username, so they state the user and worker rights once. Mosquitto 2.0 has no groups and
    a pattern cannot name a role, so each user or worker also gets a ``user`` block that
    *denies* the other role's topics under its own id (a ``deny`` in a user block wins over a
    pattern; tested against the real broker). The engine's block grants the wildcards.
    """
    p = prefix
    lines = [
        "# Written by stresswatch (docs/BROKER.md). Regenerated by `stresswatch broker add-*`:",
        "# edit the accounts with those commands, not here.",
        "#",
        "# Every authenticated account; %u is its username (its user or worker id).",
        f"pattern read {p}/engine/status",
        "# a support worker: its own alerts and the engine's replies in, its acks (and list requests) out",
        f"pattern read {p}/alerts/%u",
        f"pattern write {p}/acks/%u",
        f"pattern read {p}/replies/%u",
        "# a service user: its own samples, consent and check-ins out, its status and the engine's",
        "# confirmations of its samples in",
        f"pattern write {p}/ingest/%u",
        f"pattern read {p}/ingested/%u",
        f"pattern write {p}/consent/%u",
        f"pattern read {p}/status/%u",
        f"pattern write {p}/checkin/%u",
    ]
    for account_id in sorted(accounts):
        role = Role(accounts[account_id])
        check_account_id(account_id, role)
        lines += ["", f"# {role.value}", f"user {account_id}"]
        if role is Role.ENGINE:
            lines += [
                f"topic read {p}/ingest/+",
                f"topic write {p}/ingested/+",
                # readwrite: `stresswatch erase` clears a user's retained consent through the engine
                f"topic readwrite {p}/consent/+",
                f"topic read {p}/acks/+",
                f"topic write {p}/replies/+",
                f"topic read {p}/checkin/+",
                f"topic write {p}/alerts/+",
                f"topic readwrite {p}/status/+",
                f"topic readwrite {p}/engine/status",
            ]
        elif role is Role.WORKER:
            lines += [f"topic deny {p}/{t}/{account_id}" for t in ("ingest", "ingested", "consent", "status", "checkin")]
        else:
            lines += [f"topic deny {p}/{t}/{account_id}" for t in ("alerts", "acks", "replies")]
    return "\n".join(lines) + "\n"
