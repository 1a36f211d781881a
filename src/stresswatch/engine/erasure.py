"""Erasure as the engine does it: every store it keeps, after any chunk in flight has landed."""

from __future__ import annotations

from datetime import datetime

from ..alerts.outbox import Outbox
from ..config import DetectorSettings
from ..consent.ledger import ConsentLedger
from ..consent.rights import erase_stores
from ..store import SampleStore
from .persist import StatePersister


def erase_user(
    user: str,
    *,
    persister: StatePersister,
    ledger: ConsentLedger,
    outbox: Outbox,
    store: SampleStore | None,
    detector_settings: DetectorSettings,
    now: datetime,
) -> dict[str, int]:
    """Remove ``user`` from the stores, the live detector having forgotten them already; rows
    removed per store (see :func:`consent.rights.erase_stores`, which rewrites the stored
    snapshot chunk that holds them, at the ingest position it holds)."""
    persister.join()  # a chunk copied before the user was forgotten must land before erasure
    persister.drop_user(user, erase=True)
    return erase_stores(user, ledger=ledger, outbox=outbox, store=store, now=now, detector_settings=detector_settings)


__all__ = ["erase_user"]
