"""The user's rights over their data: export (GDPR art. 15/20) and erasure (art. 17).

**Export** gathers, for one user, everything the project keeps: consent history (with the
exact text of every version they agreed to), alert history (each alert's lifecycle), and
samples as Open mHealth data points. The Open mHealth writer lives here, in the core, on
purpose: export is a legal duty of the core and must work with no adapter installed, and the
core never imports an adapter by name. It writes the public OMH schemas (``omh:heart-rate:2.0``,
``omh:rr-interval:1.0``, ``omh:step-count:2.0``; motion, which has no OMH schema, as
``stresswatch:motion:1.0``) so any OMH reader, including the project's own openmhealth
source, can read it back.

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
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import polars as pl

from ..alerts.outbox import Outbox
from ..config import DetectorSettings
from ..store import SampleStore
from .ledger import ConsentLedger
from .state import CONSENT_TEXTS

EXPORT_SCHEMA_VERSION = 1
_OMH_NS = uuid.UUID("0a4b7c5e-2f1d-5e8a-9b3c-7d6e5f4a3b21")
# metric -> (namespace, schema name, version, body key, unit)
OMH_SCHEMAS: dict[str, tuple[str, str, str, str, str]] = {
    "hr_bpm": ("omh", "heart-rate", "2.0", "heart_rate", "beats/min"),
    "rr_ms": ("omh", "rr-interval", "1.0", "rr_interval", "ms"),
    "steps": ("omh", "step-count", "2.0", "step_count", "steps"),
    "motion": ("stresswatch", "motion", "1.0", "motion", "g"),
}


def omh_datapoints(samples: pl.DataFrame, *, created: datetime) -> Iterator[dict[str, Any]]:
    """Samples (samples schema) as Open mHealth data points. Ids are stable (UUIDv5 of the row)."""
    created_s = created.astimezone(timezone.utc).isoformat()
    times = samples.get_column("time").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_list()
    for t, (user, _, metric, value, source) in zip(times, samples.iter_rows()):
        ns, name, version, key, unit = OMH_SCHEMAS[metric]
        yield {
            "header": {
                "id": str(uuid.uuid5(_OMH_NS, f"{user}|{t}|{metric}|{value!r}|{source}")),
                "creation_date_time": created_s,
                "schema_id": {"namespace": ns, "name": name, "version": version},
                "acquisition_provenance": {"source_name": source},
            },
            "body": {key: {"value": value, "unit": unit}, "effective_time_frame": {"date_time": t}},
        }


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

    Samples are streamed one stored file (user-month) at a time, so memory stays bounded.
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
    text = json.dumps(head, indent=1)
    out.write(text[: text.rindex("}")].rstrip() + ',\n "samples": [')
    n = 0
    for path in store.files(user) if store is not None else []:
        frame = pl.read_parquet(path)
        for dp in omh_datapoints(frame, created=now):
            out.write(("\n  " if n == 0 else ",\n  ") + json.dumps(dp, separators=(",", ":")))
            n += 1
    out.write("\n ]\n}\n")
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
    from ..engine import forget_user  # the engine imports this module lazily: no cycle

    removed = {"consent_events": ledger.erase(user, now=now), "alerts": outbox.erase(user, now)}
    removed["samples"] = store.erase(user) if store is not None else 0
    blob = outbox.load_detector()
    removed["detector_state"] = 0
    if blob:
        detector = Detector.from_bytes(blob, detector_settings)
        if user in detector.users:
            outbox.save_detector(forget_user(detector, user).to_bytes(), now)
            removed["detector_state"] = 1
    return removed


def atomic_write_text(path: Path, write: Any) -> Any:
    """Call ``write(fh)`` on a temporary file next to ``path``, then rename it over ``path``."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            result = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result
