"""Alert reconciliation for the load harness (pure: counts and receipts in, figures out).

Every alert the engine raised is accounted for before a latency percentile is quoted:

    raised = withheld + suppressed + expected          (the engine's own counters, /metrics)
    expected = delivered + lost                         (the workers' receipts)

* **delivered**: a worker received the alert (first receipt of its ``alert_id``) by the
  deadline; a repeat receipt of the same id is a **duplicate** (at-least-once delivery),
  counted, never a second delivery.
* **lost**: expected but not received by the deadline (a receipt after it is **late**, and
  lost). Received alerts beyond ``expected`` are **unexpected**: the engine's counts and the
  workers disagree, and the run is not reconciled.
* **Latency** is taken over *all expected alerts*: each delivered alert's latency, and
  ``+inf`` for every lost one and for a delivered one whose latency cannot be known
  (``unmatched``: no deciding batch found). Percentiles are nearest-rank, so with 1 % or more
  of the alerts lost the p99 is infinite: a tail is never cut by leaving alerts out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Receipt:
    """One alert arriving at a worker: ``latency_s`` from the deciding batch's publish to
    the receipt, or None if no deciding batch was found; ``received_s`` on the run's clock."""

    alert_id: str
    received_s: float
    latency_s: float | None


@dataclass(frozen=True)
class Reconciliation:
    raised: int
    withheld: int
    suppressed: int
    expected: int
    delivered: int
    lost: int
    late: int
    duplicates: int
    unexpected: int
    unmatched: int
    latencies_s: tuple[float, ...]  # sorted, one per expected alert; +inf: lost or unknown

    @property
    def reconciled(self) -> bool:
        """Every raised alert is accounted for and the workers saw nothing the engine did not count."""
        return self.unexpected == 0 and self.delivered + self.lost == self.expected

    def percentile_s(self, q: float) -> float | None:
        """Nearest-rank percentile over all expected alerts (``+inf`` if it falls on a lost
        one); None when no alert was expected."""
        n = len(self.latencies_s)
        if not n:
            return None
        rank = max(1, math.ceil(q / 100.0 * n))
        return self.latencies_s[rank - 1]

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {k: getattr(self, k) for k in ("raised", "withheld", "suppressed", "expected", "delivered", "lost", "late", "duplicates", "unexpected", "unmatched")}
        out["reconciled"] = self.reconciled
        for q in (50, 99):
            p = self.percentile_s(q)
            out[f"latency_p{q}_s"] = None if p is None else (round(p, 3) if math.isfinite(p) else "inf")
        finite = [x for x in self.latencies_s if math.isfinite(x)]
        out["latency_max_delivered_s"] = round(max(finite), 3) if finite else None
        return out


def reconcile(*, raised: int, withheld: int, suppressed: int, receipts: Iterable[Receipt], deadline_s: float) -> Reconciliation:
    """Reconcile the engine's counts with the workers' ``receipts`` (any order, duplicates
    included) at ``deadline_s`` (on the receipts' clock)."""
    if min(raised, withheld, suppressed) < 0 or withheld + suppressed > raised:
        raise ValueError(f"inconsistent engine counts: raised {raised}, withheld {withheld}, suppressed {suppressed}")
    expected = raised - withheld - suppressed
    first: dict[str, Receipt] = {}
    duplicates = 0
    for r in sorted(receipts, key=lambda r: r.received_s):
        if r.alert_id in first:
            duplicates += 1
        else:
            first[r.alert_id] = r
    on_time = [r for r in first.values() if r.received_s <= deadline_s]
    late = len(first) - len(on_time)
    unexpected = max(0, len(on_time) - expected)
    delivered = len(on_time) - unexpected
    lost = expected - delivered
    known = sorted(r.latency_s for r in on_time if r.latency_s is not None)[:delivered]
    unmatched = delivered - len(known)
    latencies = tuple(known) + (math.inf,) * (unmatched + lost)
    return Reconciliation(raised, withheld, suppressed, expected, delivered, lost, late, duplicates, unexpected, unmatched, latencies)


__all__ = ["Receipt", "Reconciliation", "reconcile"]
