"""Consent: an append-only ledger (SQLite) and a pure gate checked at send time."""

from .gate import GateDecision, Verdict, decide
from .ledger import ConsentLedger
from .state import CONSENT_TEXT, CONSENT_TEXT_VERSION, Action, ConsentEvent, ConsentState, Status, Visibility, fold

__all__ = [
    "CONSENT_TEXT",
    "CONSENT_TEXT_VERSION",
    "Action",
    "ConsentEvent",
    "ConsentLedger",
    "ConsentState",
    "GateDecision",
    "Status",
    "Verdict",
    "Visibility",
    "decide",
    "fold",
]
