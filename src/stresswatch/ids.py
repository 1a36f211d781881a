"""The grammar of user, worker and group ids, defined once.

An id becomes an MQTT topic level, a broker account name, a folder name and a row key, so
it is kept to what every one of those takes without escaping: 1 to 64 characters of
``A-Z a-z 0-9 _ . -``, not starting with ``.`` or ``-`` (a hidden file, a command-line
option). That excludes MQTT wildcards (``+ #``), the topic separator ``/``, white space,
``:`` and control characters.
"""

from __future__ import annotations

import re

from .errors import ConfigError

ID_MAX_LEN = 64
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
ID_RULE = f"1-{ID_MAX_LEN} letters, digits, '_', '.' or '-', not starting with '.' or '-'"


class InvalidIdError(ConfigError):
    """A user, worker or group id that does not follow :data:`ID_RULE` (exit 78, as every
    configuration error, so broker account ids and command-line ids fail alike)."""


def validate_id(kind: str, value: str) -> str:
    """``value`` if it is a valid ``kind`` id ("user", "worker", ...); else :class:`InvalidIdError`."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        if not value:
            why = "is empty"
        elif len(value) > ID_MAX_LEN:
            why = f"is longer than {ID_MAX_LEN} characters"
        else:
            bad = next((c for c in value if not (c.isascii() and (c.isalnum() or c in "_.-"))), None)
            why = f"contains {bad!r}" if bad is not None else f"starts with {value[0]!r}"
        shown = value if len(value) <= ID_MAX_LEN + 8 else value[:ID_MAX_LEN] + "..."
        raise InvalidIdError(f"{kind} id {shown!r} {why}: use {ID_RULE}")
    return value
