"""The consent gate: a pure decision taken at send time (SPEC: consent gate).

``decide(state, alert, now)`` never does I/O. The engine reads the state from the ledger
immediately before each send, so a revocation recorded before the send always wins.
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
    WITHHELD_NO_RECIPIENT = "withheld_no_recipient"


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    recipients: tuple[str, ...] = ()
    payload: Alert | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.SEND


def decide(state: ConsentState | None, alert: AlertDecision, now: datetime) -> GateDecision:
    """May this alert go out now, to whom, and showing what?"""
    del now  # expiry and quiet hours (issue 5) will use it; kept in the contract now
    if state is None or state.status is Status.NONE:
        return GateDecision(Verdict.WITHHELD_NO_CONSENT)
    if state.status is Status.REVOKED:
        return GateDecision(Verdict.WITHHELD_REVOKED)
    if state.status is Status.PAUSED:
        return GateDecision(Verdict.WITHHELD_PAUSED)
    if not state.recipients:
        return GateDecision(Verdict.WITHHELD_NO_RECIPIENT)
    detail = state.visibility is Visibility.LEVEL_AND_REASONS
    payload = Alert(
        alert_id=alert.alert_id,
        user=state.display_name or "a person you support",
        raised_at=alert.raised_at,
        episode_start=alert.episode_start,
        level=alert.level if detail else None,
        reasons=list(alert.reasons) if detail else [],
    )
    return GateDecision(Verdict.SEND, state.recipients, payload)
