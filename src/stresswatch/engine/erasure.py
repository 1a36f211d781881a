"""Erasure as the engine does it: every store it keeps, after any save in flight has landed."""

from __future__ import annotations

from datetime import datetime

from ..alerts.outbox import Outbox
from ..config import DetectorSettings
from ..consent.ledger import ConsentLedger
from ..consent.rights import erase_stores
from ..detect import Detector
from ..store import SampleStore
from .persist import StatePersister


def erase_user(
    user: str,
    detector_without_user: Detector,
    *,
    persister: StatePersister,
    ledger: ConsentLedger,
    outbox: Outbox,
    store: SampleStore | None,
    detector_settings: DetectorSettings,
    now: datetime,
    ingest_seq: int | None = None,
) -> dict[str, int]:
    """Remove ``user`` from the stores, then save ``detector_without_user`` (the live detector,
    the user already forgotten); rows removed per store (see :func:`consent.rights.erase_stores`)."""
    persister.join()  # a save in flight holds the user's state: it must land before erasure
    persister.drop_user(user, erase=True)
    removed = erase_stores(user, ledger=ledger, outbox=outbox, store=store, now=now, detector_settings=detector_settings)
    # A snapshot may claim ingest-log records only once their samples are stored.
    stored = persister.sync_samples()
    outbox.save_detector(detector_without_user.to_bytes(), now, ingest_seq=ingest_seq if stored else None)
    return removed


__all__ = ["erase_user"]
