"""The user's rights over their data: export (GDPR art. 15/20) and erasure (art. 17).

**Export** gathers, for one user, everything the project keeps: consent history (with the
exact text of every version they agreed to), alert history (each alert's lifecycle), and
samples. Samples with an Open mHealth schema (``hr_bpm``, ``rr_ms``) are written as IEEE
1752.1 / Open mHealth data points by the ``openmhealth`` writer registered in the
``stresswatch.exporters`` entry-point group (the openmhealth adapter's ``to_omh``). One
writer, next to the reader and the schemas it validates against, so an export reads back
through ``stresswatch import openmhealth``; the core reaches it by entry point, never by
name. Samples without an OMH schema (steps, motion), or all samples if no writer is
installed, are exported as plain rows of the samples schema: nothing is left out.

**Erasure** removes the user from every store: consent ledger rows, alert rows (alerts,
deliveries, lifecycle events), stored samples and the persisted detector state. The ledger is
append-only, but the right to erasure overrides that: rows are deleted (through a guarded
path the ledger's triggers allow only for erasure) and an identity-free tombstone (time,
store, row count) is kept so an audit can see *that* an erasure happened, not *whose*.
Retained MQTT topics (consent, status) are cleared by the CLI by publishing empty retained
payloads; see docs/CONSENT.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib.metadata import entry_points
from typing import IO, Any

import polars as pl

from ..alerts.outbox import Outbox
from ..config import DetectorSettings
from ..store import SampleStore
from .ledger import ConsentLedger
from .state import CONSENT_TEXTS

EXPORT_SCHEMA_VERSION = 1
EXPORTERS_ENTRY_POINT_GROUP = "stresswatch.exporters"
OMH_METRICS = ("hr_bpm", "rr_ms")

OmhWriter = Callable[[pl.DataFrame], list[dict[str, Any]]]


def omh_writer() -> OmhWriter | None:
    """The registered Open mHealth writer (frames -> data points), or None."""
    for ep in entry_points(group=EXPORTERS_ENTRY_POINT_GROUP):
        if ep.name == "openmhealth":
            try:
                return ep.load()  # type: ignore[no-any-return]
            except Exception:  # noqa: BLE001 - a broken plug-in: export plain rows instead
                return None
    return None


def _plain_rows(frame: pl.DataFrame) -> Iterator[dict[str, Any]]:
    f = frame.with_columns(pl.col("time").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ"))
    yield from f.iter_rows(named=True)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def export_user(
    user: str,
    out: IO[str],
    *,
    ledger: ConsentLedger,
    outbox: Outbox,
    store: SampleStore | None,
    now: datetime,
) -> dict[str, int]:
    """Write the user's export document (JSON) to ``out``; returns counts per section.

    Samples are streamed one stored partition (UTC day) at a time, so memory stays bounded.
    """
    events = ledger.events(user)
    consent = [
        {
            "seq": e.seq,
            "event_id": e.event_id,
            "action": e.action.value,
            "at": _iso(e.at),
            "via": e.via,
            "text_version": e.text_version,
            "recipients": list(e.recipients),
            "visibility": e.visibility.value,
            "display_name": e.display_name,
            "quiet_hours": str(e.quiet_hours) if e.quiet_hours else None,
            "expires_at": _iso(e.expires_at),
            "timezone": e.timezone,
        }
        for e in events
    ]
    history = outbox.events(user)
    alerts = []
    for rec in outbox.records(user):
        d = outbox.decision(rec.alert_id)
        alerts.append(
            {
                "alert_id": rec.alert_id,
                "raised_at": _iso(d.raised_at),
                "episode_start": _iso(d.episode_start),
                "level": d.level.value,
                "reasons": [r.value for r in d.reasons],
                "score": d.score,
                "state": rec.state.value,
                "verdict": rec.verdict,
                "notified": list(rec.targets),
                "acknowledged_by": rec.acked_by,
                "acknowledged_at": _iso(rec.acked_at),
                "outcome": rec.outcome.value if rec.outcome else None,
                "note": rec.note,
                "checkin_note": d.note,  # a check-in: the person's own words to the workers
                "resolved_at": _iso(rec.resolved_at),
                "history": [h for h in history if h["alert_id"] == rec.alert_id],
            }
        )
    versions = sorted({e.text_version for e in events})
    head = {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "user": user,
        "exported_at": _iso(now),
        "consent_texts": {v: CONSENT_TEXTS.get(v) for v in versions},
        "consent_history": consent,
        "alerts": alerts,
    }
    writer = omh_writer()
    head["samples_format"] = "openmhealth" if writer else "stresswatch-samples-v1"
    text = json.dumps(head, indent=1)
    out.write(text[: text.rindex("}")].rstrip())
    n = 0
    for section in ("samples", "other_samples"):
        out.write(f',\n "{section}": [')
        first = True
        for frame in store.frames(user) if store is not None else ():
            if writer is None:
                items: Iterator[dict[str, Any]] | list[dict[str, Any]] = _plain_rows(frame) if section == "samples" else []
            elif section == "samples":
                items = writer(frame.filter(pl.col("metric").is_in(OMH_METRICS)))
            else:
                items = _plain_rows(frame.filter(~pl.col("metric").is_in(OMH_METRICS)))
            for item in items:
                out.write(("\n  " if first else ",\n  ") + json.dumps(item, separators=(",", ":")))
                first = False
                n += 1
        out.write("\n ]")
    out.write("\n}\n")
    return {"consent_events": len(consent), "alerts": len(alerts), "samples": n}


def erase_stores(
    user: str,
    *,
    ledger: ConsentLedger,
    outbox: Outbox,
    store: SampleStore | None,
    now: datetime,
    detector_settings: DetectorSettings | None = None,
) -> dict[str, int]:
    """Remove ``user`` from every local store; returns rows removed per store."""
    from ..detect import Detector

    removed = {"consent_events": ledger.erase(user, now=now), "alerts": outbox.erase(user, now)}
    removed["samples"] = store.erase(user) if store is not None else 0
    blob = outbox.load_detector()
    removed["detector_state"] = 0
    if blob:  # an earlier version's single-blob snapshot
        detector = Detector.from_bytes(blob, detector_settings)
        if user in detector.users:
            outbox.save_detector(detector.forget(user).to_bytes(), now)
            removed["detector_state"] = 1
    from ..engine.snapshot_files import SnapshotChunks  # the engine's side of the state folder

    files = SnapshotChunks.of_state_dir(outbox.path.parent)
    for chunk in files.chunks():  # a chunk is read whole only if it names the user
        if user not in files.users(chunk):
            continue
        state, seq = files.read(chunk)
        rest = Detector.from_chunk_states([state], detector_settings).forget(user)
        files.write(chunk, rest.state_arrays() if rest.users else None, seq)  # it still holds up to seq
        removed["detector_state"] = 1
    return removed
