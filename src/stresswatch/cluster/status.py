"""``stresswatch cluster status``: partitions, owners, lag and the last snapshot.

:func:`partition_rows` is pure (what the buckets and the stream say -> one row per
partition); :func:`read_status` gathers those inputs over NATS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from .jetstream import JetStreamIO
from .layout import Layout
from .lease import Lease


@dataclass(frozen=True)
class PartitionRow:
    partition: int
    owner: str | None  # None: no live lease (orphaned or never taken)
    lease_left_s: float | None
    last_seq: int  # the last ingest sequence of the partition in the stream (0: none)
    pending: int | None  # messages the owner's consumer has not acknowledged (None: no consumer)
    snapshot_seq: int | None
    snapshot_age_s: float | None
    snapshot_bytes: int | None
    snapshot_owner: str | None

    @property
    def snapshot_lag(self) -> int | None:
        """Stream sequence numbers since the snapshot: what a takeover would replay, at most."""
        return None if self.snapshot_seq is None else max(0, self.last_seq - self.snapshot_seq)


def partition_rows(
    partitions: int,
    leases: Mapping[int, Lease | None],
    stream: Mapping[int, tuple[int, int | None]],
    snapshots: Mapping[int, Mapping[str, object] | None],
    now_s: float,
) -> list[PartitionRow]:
    rows = []
    for p in range(partitions):
        lease = leases.get(p)
        live = lease is not None and lease.live(now_s)
        last, pending = stream.get(p, (0, None))
        snap = snapshots.get(p)
        rows.append(
            PartitionRow(
                p,
                lease.owner if live and lease else None,
                (lease.expires_s - now_s) if live and lease else None,
                last,
                pending if live else None,
                int(snap["seq"]) if snap else None,  # type: ignore[call-overload]
                (now_s - float(snap["saved_at_s"])) if snap else None,  # type: ignore[arg-type]
                int(snap["bytes"]) if snap else None,  # type: ignore[call-overload]
                str(snap["owner"]) if snap else None,
            )
        )
    return rows


def read_status(jsio: JetStreamIO, layout: Layout, now_s: float) -> tuple[list[PartitionRow], list[str]]:
    """Every partition's row, and the engines with a live heartbeat."""
    keys = [layout.lease_key(p) for p in range(layout.partitions)]
    got = jsio.leases(keys)
    leases = {p: got[k][0] for p, k in enumerate(keys)}
    stream = {p: jsio.partition_info(p) for p in range(layout.partitions)}
    snapshots: dict[int, Mapping[str, object] | None] = {}
    for p in range(layout.partitions):
        e = jsio.get(layout.state, f"snap.{p}")
        snapshots[p] = json.loads(e.value) if e is not None and e.value else None
    engines = jsio.keys(layout.leases, "engine.")
    beats = jsio.leases(engines)
    live = sorted(k.removeprefix("engine.") for k, (l, _) in beats.items() if l is not None and l.live(now_s))
    return partition_rows(layout.partitions, leases, stream, snapshots, now_s), live


__all__ = ["PartitionRow", "partition_rows", "read_status"]
