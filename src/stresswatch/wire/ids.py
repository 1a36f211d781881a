"""The one grammar of ids: users, workers, groups, consent recipients, broker accounts, streams.

An id becomes an MQTT topic level (``{prefix}/ingest/{user}``, ``{prefix}/alerts/{worker}``),
a broker username (``%u`` in the ACL) and a key in the SQLite stores, so it is kept to what
every one of those carries verbatim: 1 to 64 characters of ``A-Z a-z 0-9 _ . -``, not
starting with ``.`` or ``-`` (no hidden files, no option-like words). That excludes the MQTT
wildcards ``+ #``, the level separator ``/``, the password file's ``:``, white space, control
characters and the empty string.
"""

from __future__ import annotations

import re

from ..errors import InvalidId

MAX_ID_CHARS = 64
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
ID_RULE = "1-64 characters of letters, digits, '_', '.' or '-', not starting with '.' or '-'"


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def validate_id(kind: str, value: str) -> str:
    """``value`` if it is a valid ``kind`` id (``"user"``, ``"worker"``, ``"recipient"``...);
    otherwise :class:`~stresswatch.errors.InvalidId` (a ``ParseError`` and a ``ValueError``, so
    pydantic validators and the CLI's one-line errors both take it) saying the rule. The message
    never repeats the value, which may be anything a client sent."""
    if not is_valid_id(value):
        raise InvalidId(f"{kind} id must be {ID_RULE}", field=kind)
    return value


__all__ = ["ID_PATTERN", "ID_RULE", "MAX_ID_CHARS", "is_valid_id", "validate_id"]
