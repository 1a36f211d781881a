"""The consent gate: a pure decision taken at send time (SPEC: consent gate).

``decide(state, alert, now)`` never does I/O. The engine reads the state from the ledger
immediately before each publish, so a revocation recorded before the publish always wins,
including for an alert that was raised earlier and is still waiting in the outbox.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from ..model import Alert, AlertDecision
from .state import ConsentState, Status, Visibility


class Verdict(str, enum.Enum):
    SEND = "send"
    WITHHELD_NO_CONSENT = "withheld_no_consent"
    WITHHELD_PAUSED = "withheld_paused"
    WITHHELD_REVOKED = "withheld_revoked"
    WITHHELD_EXPIRED = "withheld_expired"
    WITHHELD_NO_RECIPIENT = "withheld_no_recipient"
    DEFERRED_QUIET_HOURS = "deferred_quiet_hours"  # not now; ask again at ``retry_at``


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    recipients: tuple[str, ...] = ()  # workers or groups, in the order the user chose
    payload: Alert | None = None
    retry_at: datetime | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.SEND

    @property
    def deferred(self) -> bool:
        return self.verdict is Verdict.DEFERRED_QUIET_HOURS


def decide(
    state: ConsentState | None, alert: AlertDecision, now: datetime, *, queued_at: datetime | None = None
) -> GateDecision:
    """May this alert go out now, to whom, and showing what?

    ``queued_at``: when the alert entered the outbox. An alert queued before the user's last
    withdrawal is never sent, even if the user granted again since: withdrawal drops what
    was waiting, and a new grant applies to new alerts only.
    """
    if state is None or state.status is Status.NONE:
        return GateDecision(Verdict.WITHHELD_NO_CONSENT)
    if state.status is Status.REVOKED:
        return GateDecision(Verdict.WITHHELD_REVOKED)
    if queued_at is not None and state.withdrawn_at is not None and queued_at <= state.withdrawn_at:
        return GateDecision(Verdict.WITHHELD_REVOKED)
    if state.expired(now):
        return GateDecision(Verdict.WITHHELD_EXPIRED)
    if state.status is Status.PAUSED:
        return GateDecision(Verdict.WITHHELD_PAUSED)
    if not state.recipients:
        return GateDecision(Verdict.WITHHELD_NO_RECIPIENT)
    if state.quiet_hours is not None:
        ends = state.quiet_hours.ends_after(now)
        if ends is not None:
            return GateDecision(Verdict.DEFERRED_QUIET_HOURS, state.recipients, retry_at=ends)
    detail = state.visibility in (Visibility.LEVEL_AND_REASONS, Visibility.LEVEL_REASONS_AND_SCORE)
    payload = Alert(
        alert_id=alert.alert_id,
        user=state.display_name or "a person you support",
        raised_at=alert.raised_at,
        episode_start=alert.episode_start,
        level=alert.level if detail else None,
        reasons=list(alert.reasons) if detail else [],
        score=round(alert.score, 2) if state.visibility is Visibility.LEVEL_REASONS_AND_SCORE else None,
        note=alert.note,
    )
    return GateDecision(Verdict.SEND, state.recipients, payload)


def alert_wire(payload: Alert, *, notice: int = 0) -> bytes:
    """The MQTT payload: fields the user did not allow are absent, not null."""
    return payload.model_copy(update={"notice": notice}).model_dump_json(exclude_none=True).encode()
