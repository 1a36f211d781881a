"""Names of a cluster's JetStream objects and the partition of a user (pure).

A user's partition is FNV-1a (32 bit) of the user id's UTF-8 bytes modulo the number of
partitions: the hash NATS's own subject mapping ``{{partition(P,1)}}`` applies to one
subject token, so a server-side mapping of ``ingest.*`` and this function agree for ids
without a dot. The publisher (the bridge) computes it and publishes on ``<name>.ingest.<p>``
with the user in a header; ids may contain dots, which a NATS subject token cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ClusterSettings

USER_HEADER = "Sw-User"
# What a partition's message is (absent: an ingest batch). Workers' acks, users' check-ins and
# erasures travel in the partition of the user they concern, so they are applied in order with
# that user's batches by the partition's owner and replayed from its snapshot on a takeover.
KIND_HEADER = "Sw-Kind"
KIND_INGEST, KIND_ACK, KIND_CHECKIN, KIND_ERASE = "ingest", "ack", "checkin", "erase"
# A worker's list request goes to every partition; each owner answers its part on the NATS
# subject in this header, and the bridge merges the parts into the worker's one reply.
KIND_LIST = "list"
REPLY_HEADER = "Sw-Reply"
MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream's own de-duplication within its duplicate window

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(user: str, partitions: int) -> int:
    """The partition (0 .. partitions-1) that holds every batch of ``user``."""
    return fnv1a_32(user.encode()) % partitions


@dataclass(frozen=True)
class Layout:
    """Stream, bucket and subject names; ``partitions`` and ``replicas`` from settings."""

    partitions: int = 16
    replicas: int = 3
    name: str = "sw"  # one cluster's namespace on a NATS system (lower case letters, digits)
    user_token: bool = False  # subjects <name>.ingest.<p>.<user> (NATS's MQTT listener, mapped by the server)

    @property
    def stream(self) -> str:
        return f"{self.name.upper()}_INGEST"

    @property
    def subject_root(self) -> str:
        return f"{self.name}.ingest"

    @property
    def windows_stream(self) -> str:
        return f"{self.name.upper()}_WINDOWS"

    @property
    def windows_root(self) -> str:
        return f"{self.name}.windows"

    @property
    def leases(self) -> str:
        """Partition leases and engine heartbeats."""
        return f"{self.name}_leases"

    @property
    def consent(self) -> str:
        """One key per user: the user's consent message (every event)."""
        return f"{self.name}_consent"

    @property
    def sent(self) -> str:
        """Publish-once markers: alert id, worker, notice."""
        return f"{self.name}_sent"

    @property
    def alerts(self) -> str:
        """Alert index: alert id -> the partition holding it (where a worker's ack goes)."""
        return f"{self.name}_alerts"

    @property
    def state(self) -> str:
        """The layout and each partition's last snapshot (for status)."""
        return f"{self.name}_state"

    @property
    def snapshots(self) -> str:
        """Object store: one object per partition."""
        return f"{self.name}_snapshots"

    @classmethod
    def of(cls, settings: ClusterSettings) -> Layout:
        return cls(partitions=settings.partitions, replicas=settings.replicas, name=settings.name, user_token=settings.companions == "nats-mqtt")

    @property
    def ingest_subjects(self) -> str:
        """What the ingest stream captures."""
        return f"{self.subject_root}.*.*" if self.user_token else f"{self.subject_root}.*"

    def subject(self, p: int) -> str:
        """Partition ``p``'s ingest: a consumer's filter, a purge's subject."""
        return f"{self.subject_root}.{p}.*" if self.user_token else f"{self.subject_root}.{p}"

    def ingest_subject(self, user: str) -> str:
        """Where a publisher puts ``user``'s batch (with the user header, :mod:`.publish`)."""
        p = partition_of(user, self.partitions)
        return f"{self.subject_root}.{p}.{user}" if self.user_token else f"{self.subject_root}.{p}"

    def user_of(self, subject: str) -> str:
        """The user token of an ingest subject (``user_token`` layouts), else empty."""
        return subject.rsplit(".", 1)[1] if self.user_token and subject.count(".") == self.subject_root.count(".") + 2 else ""

    def windows_subject(self, p: int) -> str:
        return f"{self.windows_root}.{p}"

    @staticmethod
    def consumer(p: int) -> str:
        return f"part-{p}"

    @staticmethod
    def lease_key(p: int) -> str:
        return f"part.{p}"

    @staticmethod
    def engine_key(engine_id: str) -> str:
        return f"engine.{engine_id}"

    @staticmethod
    def snapshot_name(p: int) -> str:
        return f"part-{p}"

    @staticmethod
    def sent_key(alert_id: str, worker: str, notice: int) -> str:
        return f"{alert_id}.{worker}.{notice}"


__all__ = [
    "KIND_ACK", "KIND_CHECKIN", "KIND_ERASE", "KIND_HEADER", "KIND_INGEST", "KIND_LIST", "Layout", "REPLY_HEADER", "MSG_ID_HEADER", "USER_HEADER",
    "fnv1a_32", "partition_of",
]  # fmt: skip
