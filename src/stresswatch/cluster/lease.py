"""Partition leases (pure): who takes, keeps or releases which partition.

A lease is a key per partition in a JetStream key-value bucket whose value names the owner
and when the lease ends (wall clock, seconds). Every write is a compare-and-set on the key's
revision, so two engines never both win a partition; an owner that cannot renew (its
revision is stale: someone took over) drops the partition at once. The clocks of the engine
hosts must agree to well within the TTL (NTP).

Balance: each live engine (a heartbeat key, same TTL) aims at ``ceil(P / live)`` partitions.
It takes free or expired partitions up to that share, and every expired one whatever its
share (nobody else may be left to); an engine above its share releases one partition per
round while another live engine is below it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Lease:
    owner: str
    expires_s: float

    def encode(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires_s": self.expires_s}).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Lease | None:
        """None for an absent, deleted or unreadable value (a free partition)."""
        if not data:
            return None
        try:
            d = json.loads(data)
            return cls(str(d["owner"]), float(d["expires_s"]))
        except (ValueError, KeyError, TypeError):
            return None

    def live(self, now_s: float) -> bool:
        return self.expires_s > now_s


@dataclass(frozen=True)
class Plan:
    take: tuple[int, ...]
    release: tuple[int, ...]


def plan(
    leases: Mapping[int, Lease | None],
    me: str,
    owned: frozenset[int] | set[int],
    live_engines: int,
    now_s: float,
    partitions: int,
) -> Plan:
    """What ``me`` should do this round. ``leases``: every partition's lease as last seen
    (absent = free); ``owned``: what ``me`` holds; ``live_engines``: with a heartbeat, ``me``
    included."""
    share = math.ceil(partitions / max(live_engines, 1))
    expired = [p for p in range(partitions) if p not in owned and (l := leases.get(p)) is not None and not l.live(now_s)]
    free = [p for p in range(partitions) if p not in owned and leases.get(p) is None]
    room = max(0, share - len(owned))
    take = [*expired, *free[: max(0, room - len(expired))]]
    # Above the share with another engine alive: by pigeonhole some engine is below it.
    release: tuple[int, ...] = ()
    if len(owned) > share and live_engines > 1 and not take:
        release = (max(owned),)
    return Plan(tuple(take), release)


__all__ = ["Lease", "Plan", "plan"]
