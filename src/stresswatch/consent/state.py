"""Consent events and the state derived from them (pure; the ledger stores the events)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Action(str, enum.Enum):
    GRANT = "grant"
    PAUSE = "pause"
    RESUME = "resume"
    REVOKE = "revoke"


class Status(str, enum.Enum):
    NONE = "none"  # never granted
    ACTIVE = "active"
    PAUSED = "paused"
    REVOKED = "revoked"


class Visibility(str, enum.Enum):
    """What a worker may see in an alert (SPEC: only the detail the user's consent allows)."""

    REACH_OUT = "reach_out"  # default: a plain prompt to reach out, no level, no reasons
    LEVEL_AND_REASONS = "level_and_reasons"


CONSENT_TEXT_VERSION = "2026-11-1"
CONSENT_TEXT = (
    "I choose to share a 'reach out' signal, derived from my heart rate and heart-rate variability, "
    "with the support workers I name. They will see only what I allow. It is not a diagnosis. "
    "I can pause, change or withdraw this at any time, and withdrawal takes effect at once."
)


@dataclass(frozen=True)
class ConsentEvent:
    user: str
    action: Action
    at: datetime
    via: str  # how it was given: "cli", "mqtt", "demo"
    text_version: str = CONSENT_TEXT_VERSION
    recipients: tuple[str, ...] = ()
    visibility: Visibility = Visibility.REACH_OUT
    display_name: str | None = None
    seq: int | None = None  # assigned by the ledger


@dataclass(frozen=True)
class ConsentState:
    user: str
    status: Status = Status.NONE
    recipients: tuple[str, ...] = ()
    visibility: Visibility = Visibility.REACH_OUT
    display_name: str | None = None
    since: datetime | None = None
    text_version: str | None = None
    history: tuple[ConsentEvent, ...] = field(default=(), repr=False)


def fold(user: str, events: list[ConsentEvent] | tuple[ConsentEvent, ...]) -> ConsentState:
    """Derive the current state from the user's events in ledger order."""
    state = ConsentState(user)
    for ev in events:
        if ev.action is Action.GRANT:
            state = ConsentState(
                user,
                Status.ACTIVE,
                ev.recipients,
                ev.visibility,
                ev.display_name or state.display_name,
                ev.at,
                ev.text_version,
            )
        elif ev.action is Action.PAUSE and state.status is Status.ACTIVE:
            state = ConsentState(user, Status.PAUSED, state.recipients, state.visibility, state.display_name, ev.at, state.text_version)
        elif ev.action is Action.RESUME and state.status is Status.PAUSED:
            state = ConsentState(user, Status.ACTIVE, state.recipients, state.visibility, state.display_name, ev.at, state.text_version)
        elif ev.action is Action.REVOKE:
            state = ConsentState(user, Status.REVOKED, (), Visibility.REACH_OUT, state.display_name, ev.at, ev.text_version)
    return ConsentState(
        user, state.status, state.recipients, state.visibility, state.display_name, state.since, state.text_version, tuple(events)
    )
