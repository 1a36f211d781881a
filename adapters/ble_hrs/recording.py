"""BLE recording files (``*.ble.jsonl``): what the radio delivered, with arrival times.

Format (JSON lines, UTF-8; version 1)::

    {"format": "stresswatch-ble-hrs", "version": 1, "device": {"address": "F0:0D:..", "name": "H10"},
     "user": "alice", "note": "..."}
    {"t_ns": 1764028800123456789, "ev": "connected"}
    {"t_ns": 1764028800223456789, "ev": "location", "hex": "01"}
    {"t_ns": 1764028801123456789, "ev": "notify", "hex": "163c1a032e03"}
    {"t_ns": 1764028900000000000, "ev": "disconnected"}

* line 1 is the header; ``device.address`` is what replay enrolls (fixtures use made-up
  addresses); ``user`` is optional (``stresswatch replay`` falls back to ``--user``/file name).
* every later line is one event: ``t_ns`` the host's arrival time (ns since the Unix epoch,
  UTC, non-decreasing), ``ev`` one of :data:`EVENT_KINDS`, ``hex`` the characteristic value
  exactly as received (``notify``: 0x2A37, ``location``: 0x2A38).

Why JSON lines: appendable while recording (a crash loses at most the last line, which the
reader reports), diffable in review, and ~45 bytes per notification (an hour at 1 Hz is
~160 kB). Errors name the file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from stresswatch.errors import ParseError
from stresswatch.fsio import atomic_writer, fsync_file

FORMAT = "stresswatch-ble-hrs"
VERSION = 1
SUFFIX = ".ble.jsonl"
EVENT_KINDS = ("connected", "disconnected", "notify", "location")


@dataclass(frozen=True)
class RecordedEvent:
    t_ns: int
    ev: str
    data: bytes = b""


@dataclass(frozen=True)
class Recording:
    address: str
    name: str | None
    events: tuple[RecordedEvent, ...]
    user: str | None = None
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def notifications(self) -> list[RecordedEvent]:
        return [e for e in self.events if e.ev == "notify"]


def header_line(address: str, name: str | None = None, *, user: str | None = None, note: str | None = None) -> str:
    head: dict[str, Any] = {"format": FORMAT, "version": VERSION, "device": {"address": address, "name": name}}
    if user:
        head["user"] = user
    if note:
        head["note"] = note
    return json.dumps(head, separators=(",", ":"))


def event_line(event: RecordedEvent) -> str:
    obj: dict[str, Any] = {"t_ns": event.t_ns, "ev": event.ev}
    if event.data or event.ev in ("notify", "location"):
        obj["hex"] = event.data.hex()
    return json.dumps(obj, separators=(",", ":"))


class RecordingWriter:
    """Appends events as they happen; flushed per line so a crash loses at most one line."""

    def __init__(self, path: Path, address: str, name: str | None = None, *, user: str | None = None, note: str | None = None):
        self.path = Path(path)
        self._fh: IO[str] = self.path.open("x", encoding="utf-8")
        self._fh.write(header_line(address, name, user=user, note=note) + "\n")
        self._fh.flush()
        self.count = 0

    def write(self, event: RecordedEvent) -> None:
        self._fh.write(event_line(event) + "\n")
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        self._fh.close()
        fsync_file(self.path)  # durable before `record` renames it into place (fsio.commit_rename)

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_recording(path: Path, recording: Recording, *, note: str | None = None) -> None:
    """Write a whole recording atomically (temp file + rename): never a half-written fixture."""
    with atomic_writer(Path(path), mode=0o644) as fh:
        fh.write(header_line(recording.address, recording.name, user=recording.user, note=note) + "\n")
        for e in recording.events:
            fh.write(event_line(e) + "\n")


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with Path(path).open("r", encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                yield n, line
    except FileNotFoundError:
        raise ParseError("no such file", source=path) from None
    except UnicodeDecodeError as exc:
        raise ParseError(f"not UTF-8 text ({exc.reason})", source=path) from None
    except OSError as exc:
        raise ParseError(f"cannot read: {exc.strerror}", source=path) from None


def read_recording(path: str | Path) -> Recording:
    """Read and validate a recording; :class:`ParseError` names the line and field."""
    path = Path(path)
    header: dict[str, Any] | None = None
    events: list[RecordedEvent] = []
    last_t = None
    for n, line in _iter_lines(path):
        where = f"line {n}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ParseError(f"not JSON: {exc.msg}", source=path, position=where) from None
        if not isinstance(obj, dict):
            raise ParseError("expected a JSON object", source=path, position=where)
        if header is None:
            if obj.get("format") != FORMAT:
                raise ParseError(f"not a BLE recording (format should be {FORMAT!r})", source=path, position=where, field="format")
            if obj.get("version") != VERSION:
                raise ParseError(f"unknown version {obj.get('version')!r} (known: {VERSION})", source=path, position=where, field="version")
            device = obj.get("device")
            if not isinstance(device, dict) or not isinstance(device.get("address"), str) or not device["address"]:
                raise ParseError("missing device address", source=path, position=where, field="device.address")
            header = obj
            continue
        t = obj.get("t_ns")
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ParseError("expected a non-negative integer", source=path, position=where, field="t_ns")
        if last_t is not None and t < last_t:
            raise ParseError("time goes backwards", source=path, position=where, field="t_ns")
        ev = obj.get("ev")
        if ev not in EVENT_KINDS:
            raise ParseError(f"unknown event {ev!r} (known: {', '.join(EVENT_KINDS)})", source=path, position=where, field="ev")
        data = b""
        if ev in ("notify", "location"):
            hx = obj.get("hex")
            try:
                data = bytes.fromhex(hx) if isinstance(hx, str) else None  # type: ignore[assignment]
            except ValueError:
                data = None  # type: ignore[assignment]
            if data is None:
                raise ParseError("expected hex bytes", source=path, position=where, field="hex")
        events.append(RecordedEvent(t, ev, data))
        last_t = t
    if header is None:
        raise ParseError("empty file (no header line)", source=path, position="line 1")
    device = header["device"]
    return Recording(
        address=device["address"],
        name=device.get("name"),
        events=tuple(events),
        user=header.get("user") if isinstance(header.get("user"), str) else None,
        header=header,
    )
