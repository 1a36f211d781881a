"""Consent events and the state derived from them (pure; the ledger stores the events).

A user's consent says *who* may be alerted (named workers or groups, in the order they
should be tried), *what* they may see (:class:`Visibility`), *when* not to alert them
(quiet hours in the user's own time zone) and *until when* it holds (expiry). Each event
records the exact consent text version the user agreed to and *how* it was given.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from ..clock import is_zone
from ..errors import ConsentError


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
    # Opt-in only: additionally the detector's score, the one number derived from the user's
    # physiology that an alert can carry. Raw samples never travel in an alert.
    LEVEL_REASONS_AND_SCORE = "level_reasons_and_score"


CONSENT_TEXT_VERSION = "2026-11-2"
CONSENT_TEXT = (
    "I choose to share a 'reach out' signal, derived from my heart rate and heart-rate variability, "
    "with the support workers or groups I name. They will see only what I allow: by default a plain "
    "prompt to reach out, and the level, reasons or score only if I choose so. I can set quiet hours "
    "when no one is alerted and a date when this consent ends. It is not a diagnosis. The engine "
    "processes my heart data only while this consent holds. I can pause, change or withdraw this at "
    "any time, withdrawal takes effect at once, and I can export or erase my data."
)
# Every text ever shown, so a ledger row's version can always be resolved to the words agreed to.
CONSENT_TEXTS: dict[str, str] = {
    "2026-11-1": (
        "I choose to share a 'reach out' signal, derived from my heart rate and heart-rate variability, "
        "with the support workers I name. They will see only what I allow. It is not a diagnosis. "
        "I can pause, change or withdraw this at any time, and withdrawal takes effect at once."
    ),
    CONSENT_TEXT_VERSION: CONSENT_TEXT,
}


def check_zone(tz: str) -> str:
    """``tz`` if it names an IANA time zone (e.g. ``Asia/Tokyo``), else :class:`ConsentError`."""
    if not is_zone(tz):
        raise ConsentError(f"unknown time zone {tz!r} (expected an IANA name such as Europe/London)")
    return tz


@dataclass(frozen=True)
class QuietHours:
    """A daily span in the user's local time during which no one is alerted (may cross midnight)."""

    start: time
    end: time
    tz: str = "UTC"

    @classmethod
    def parse(cls, text: str, tz: str = "UTC") -> QuietHours:
        """``"22:00-07:00"`` in time zone ``tz`` (IANA name, e.g. ``Europe/London``)."""
        try:
            a, b = text.split("-")
            start, end = time.fromisoformat(a.strip()), time.fromisoformat(b.strip())
        except ValueError:
            raise ConsentError(f"quiet hours {text!r}: expected HH:MM-HH:MM") from None
        if start == end:
            raise ConsentError(f"quiet hours {text!r}: start and end are the same")
        return cls(start, end, check_zone(tz))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.tz}"

    def encode(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}@{self.tz}"

    @classmethod
    def decode(cls, text: str | None) -> QuietHours | None:
        if not text:
            return None
        span, _, tz = text.partition("@")
        return cls.parse(span, tz or "UTC")

    def ends_after(self, now: datetime) -> datetime | None:
        """If ``now`` is inside quiet hours, when they end (UTC-aware); else None."""
        zone = ZoneInfo(self.tz)
        local = now.astimezone(zone)
        t = local.timetz().replace(tzinfo=None)
        if self.start < self.end:
            inside = self.start <= t < self.end
            end_day = local.date()
        else:  # crosses midnight
            inside = t >= self.start or t < self.end
            end_day = local.date() + timedelta(days=1) if t >= self.start else local.date()
        if not inside:
            return None
        return datetime.combine(end_day, self.end, zone).astimezone(now.tzinfo)


@dataclass(frozen=True)
class ConsentEvent:
    user: str
    action: Action
    at: datetime
    via: str  # how it was given: "cli", "mqtt", "demo"
    text_version: str = CONSENT_TEXT_VERSION
    recipients: tuple[str, ...] = ()  # workers or groups, in the order they are tried
    visibility: Visibility = Visibility.REACH_OUT
    display_name: str | None = None
    quiet_hours: QuietHours | None = None
    expires_at: datetime | None = None
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))  # idempotent transfer over MQTT
    # the person's own time zone (IANA name): the detector's time-of-day slots follow it
    timezone: str | None = None
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
    quiet_hours: QuietHours | None = None
    expires_at: datetime | None = None
    withdrawn_at: datetime | None = None  # the last revocation, kept across a later grant
    timezone: str | None = None  # the person's own zone, as their latest grant names it

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def allows_processing(self, now: datetime) -> bool:
        """SPEC: the engine stores and processes samples only while consent allows it.

        Active or paused (a pause stops alerts, not the baseline the user will come back
        to) and not expired.
        """
        return self.status in (Status.ACTIVE, Status.PAUSED) and not self.expired(now)


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
                quiet_hours=ev.quiet_hours,
                expires_at=ev.expires_at,
                timezone=ev.timezone,
            )
        elif ev.action is Action.PAUSE and state.status is Status.ACTIVE:
            state = replace(state, status=Status.PAUSED, since=ev.at)
        elif ev.action is Action.RESUME and state.status is Status.PAUSED:
            state = replace(state, status=Status.ACTIVE, since=ev.at)
        elif ev.action is Action.REVOKE:
            state = ConsentState(user, Status.REVOKED, (), Visibility.REACH_OUT, state.display_name, ev.at, ev.text_version)
    withdrawn = [ev.at for ev in events if ev.action is Action.REVOKE]
    return replace(state, history=tuple(events), withdrawn_at=max(withdrawn) if withdrawn else None)


@dataclass(frozen=True)
class ChangeDecision:
    """Whether a pause, resume or revoke would change anything; if not, why (for the user)."""

    allowed: bool
    reason: str = ""


def decide_change(state: ConsentState, action: Action, now: datetime) -> ChangeDecision:
    """Pure: may ``action`` be recorded on ``state`` at ``now``?

    An action that would change nothing (pause without an active consent, resume of a
    consent that is not paused, a second revoke) is refused, so the ledger records only
    what a user actually changed. A grant always changes something (it replaces the whole
    choice), so it is always allowed here; its own checks (recipients, expiry) are the
    ledger's.
    """
    if action is Action.GRANT:
        return ChangeDecision(True)
    user, status = state.user, state.status
    grant_hint = f"to be alerted again, grant anew: stresswatch consent grant --user {user} --to WORKER"
    if status is Status.NONE:
        return ChangeDecision(False, f"{user} has no consent to {action.value}: nothing recorded (grant first: stresswatch consent grant --user {user} --to WORKER)")
    if status is Status.REVOKED:
        if action is Action.REVOKE:
            return ChangeDecision(False, f"{user}'s consent is already revoked (since {state.since:%Y-%m-%d %H:%M} UTC): nothing recorded")
        return ChangeDecision(False, f"{user}'s consent was revoked, so there is nothing to {action.value}: nothing recorded; {grant_hint}")
    if action is Action.REVOKE:
        return ChangeDecision(True)
    if state.expired(now):
        assert state.expires_at is not None
        return ChangeDecision(
            False, f"{user}'s consent expired at {state.expires_at:%Y-%m-%d %H:%M} UTC, so there is nothing to {action.value}: nothing recorded; {grant_hint}"
        )
    if action is Action.PAUSE and status is Status.PAUSED:
        return ChangeDecision(False, f"{user}'s consent is already paused (since {state.since:%Y-%m-%d %H:%M} UTC): nothing recorded")
    if action is Action.RESUME and status is Status.ACTIVE:
        return ChangeDecision(False, f"{user}'s consent is not paused: alerts already go to {', '.join(state.recipients)}; nothing recorded")
    return ChangeDecision(True)
