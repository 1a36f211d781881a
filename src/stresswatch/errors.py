"""One error root, a subclass per boundary. Each carries the data a user needs to fix the input.

The CLI turns any :class:`StresswatchError` into one line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class StresswatchError(Exception):
    """Root of every error the project raises on purpose."""

    exit_code: int = 1


class ParseError(StresswatchError):
    """Input bytes or records that do not follow their format.

    ``source`` names the file (or stream), ``position`` the line, row or byte offset,
    ``field`` the column or field, when known.
    """

    exit_code = 65  # EX_DATAERR

    def __init__(
        self,
        message: str,
        *,
        source: str | Path | None = None,
        position: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.source = str(source) if source is not None else None
        self.position = position
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.source, self.position) if p is not None)
        if self.field:
            where = f"{where} field {self.field!r}".strip()
        return f"{where}: {self.message}" if where else self.message


class InvalidId(ParseError, ValueError):
    """An id (user, worker, group, recipient, account) outside the one id grammar
    (:mod:`stresswatch.wire.ids`); also a ``ValueError`` so pydantic validators can raise it."""


class WireError(ParseError):
    """A wire message (ingest, consent, ack) refused at the boundary (:mod:`stresswatch.wire`).

    ``reason`` is a short code for counters and rate-limited logs (``malformed``, ``too_large``,
    ``time_range``, ``value_range``, ``bad_id``, ``wrong_user``); ``field`` names the field. The
    message never carries a value from the payload.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        source: str | Path | None = None,
        position: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        super().__init__(message, source=source, position=position, field=field)


class PacketError(ParseError):
    """Bytes from a broker that are not a well-formed MQTT packet (:mod:`stresswatch.mqtt_packets`);
    ``position`` is the byte offset in the receive buffer."""


class ConfigError(StresswatchError):
    """Configuration (TOML file, environment, command-line overrides) that does not validate."""

    exit_code = 78  # EX_CONFIG

    def __init__(self, message: str, *, source: str | Path | None = None, field: str | None = None) -> None:
        self.message = message
        self.source = str(source) if source is not None else None
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = ""
        if self.source:
            prefix += f"{self.source}: "
        if self.field:
            prefix += f"{self.field}: "
        return prefix + self.message


class ConsentError(StresswatchError):
    """A consent operation that cannot be carried out (unknown user, invalid change)."""

    def __init__(self, message: str, *, user: str | None = None) -> None:
        self.user = user
        super().__init__(message)


class TransportError(StresswatchError):
    """The MQTT broker could not be reached, refused us, or did not acknowledge in time."""

    exit_code = 69  # EX_UNAVAILABLE

    def __init__(self, message: str, *, url: str | None = None) -> None:
        self.url = url
        super().__init__(f"{url}: {message}" if url else message)



class ClusterError(StresswatchError):
    """NATS JetStream (cluster mode) could not be reached, refused a request, or disagrees
    with this engine's layout (another number of partitions)."""

    exit_code = 69  # EX_UNAVAILABLE

class StorageError(StresswatchError):
    """A local store (SQLite, Parquet) that cannot be read or written."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path else message)
