"""Broker accounts: ids (a username and a topic level at once), roles, mosquitto's ``$7$``
password hashes, generated passwords, and session client ids only the password's holder can
derive. Pure functions, no files (:mod:`.directory` keeps them on disk).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets

from ..errors import ConfigError
from ..wire.ids import ID_RULE, is_valid_id


class Role(str, enum.Enum):
    """What an account may do; the ACL (:func:`render_acl`) spells it out per topic."""

    USER = "user"
    WORKER = "worker"
    ENGINE = "engine"


DEFAULT_ENGINE_ID = "stresswatch-engine"
_ID_MAX_LEN = 128


def check_account_id(value: str, role: Role | str = "account") -> str:
    """An id is a broker username *and* a topic level (``%u`` in the ACL), so it must be
    non-empty and free of ``+ # /`` (wildcards and separators), control characters, ``:``
    (the password file's separator) and white space (the ACL file's separator)."""
    kind = role.value if isinstance(role, Role) else role
    if not value:
        raise ConfigError(f"{kind} id must not be empty", field="id")
    if len(value) > _ID_MAX_LEN:
        raise ConfigError(f"{kind} id is longer than {_ID_MAX_LEN} characters", field="id")
    for c in value:
        if c in "+#/":
            why = f"contains {c!r} (an MQTT wildcard or topic separator)"
        elif ord(c) < 32 or 127 <= ord(c) < 160:
            why = f"contains the control character U+{ord(c):04X}"
        elif c == ":":
            why = "contains ':' (the password file separator)"
        elif c.isspace():
            why = "contains white space"
        else:
            continue
        raise ConfigError(f"{kind} id {value!r} {why}; use letters, digits, '-', '_' or '.'", field="id")
    if not is_valid_id(value):  # the one id grammar (stresswatch.wire.ids), which topics use too
        raise ConfigError(f"{kind} id {value!r} must be {ID_RULE}", field="id")
    return value


# mosquitto 2.0 ``$7$`` hashes: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte key, base64.
# mosquitto_passwd defaults to 101 iterations; 1,000 costs the broker about 2 ms per CONNECT
# (measured here) and stretches an operator-chosen password tenfold. Generated passwords have
# 192 random bits, for which stretching adds nothing.
PBKDF2_ITERATIONS = 1000


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """The password-file field mosquitto 2.0 verifies (``$7$iterations$salt$hash``)."""
    if not password:
        raise ConfigError("password must not be empty", field="password")
    salt = salt if salt is not None else secrets.token_bytes(12)
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches a ``$7$`` field (constant-time comparison)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt, key = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(key))
    return hmac.compare_digest(got, key)


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def private_client_id(base: str, password: str | None) -> str:
    """``base`` plus a tag derived from the account's password, for persistent sessions.

    Mosquitto 2.0.11 lets any authenticated account connect with any client id, and a
    CONNECT with an existing id takes that session over: measured here, a user connecting as
    ``stresswatch-worker-sam`` wiped sam's queued alerts and subscription (the ACL kept the
    alerts from the intruder, but sam never received them). A client id nobody can guess
    without the password closes that hole while staying stable across restarts, so the
    session (and its queue) is found again on reconnect. Without a password: ``base``.
    """
    if not password:
        return base
    tag = hashlib.sha256(b"stresswatch-client-id\x00" + password.encode("utf-8")).hexdigest()[:16]
    return f"{base}-{tag}"
