"""A partition's state as one object (pure): what a new owner loads before replaying.

Layout: 8 bytes magic ``SWSNAP01``, 4 bytes (big-endian) header length, the JSON header,
then the sections named in the header, back to back: the detector's state
(``Detector.to_bytes``) and the partition's alert outbox (a SQLite database image: alerts,
deliveries, lifecycle events). The header holds the partition, the last applied stream
sequence, the de-duplication state and when and by whom it was saved. A consent view is not
copied: consent lives in its own bucket, which every owner reads (the header records the
bucket's revision the snapshot was taken at, for operators).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from ..errors import StorageError

MAGIC = b"SWSNAP01"


@dataclass(frozen=True)
class Snapshot:
    partition: int
    seq: int  # the last ingest stream sequence whose batch the state contains
    saved_at_s: float
    owner: str
    detector: bytes
    outbox: bytes
    dedup: list[list[object]]
    consent_revision: int = 0

    def encode(self) -> bytes:
        header = {
            "partition": self.partition,
            "seq": self.seq,
            "saved_at_s": self.saved_at_s,
            "owner": self.owner,
            "dedup": self.dedup,
            "consent_revision": self.consent_revision,
            "sections": {"detector": len(self.detector), "outbox": len(self.outbox)},
        }
        h = json.dumps(header, separators=(",", ":")).encode()
        return b"".join((MAGIC, struct.pack(">I", len(h)), h, self.detector, self.outbox))

    @classmethod
    def decode(cls, data: bytes) -> Snapshot:
        """:class:`StorageError` for anything that is not a whole snapshot."""
        if data[:8] != MAGIC or len(data) < 12:
            raise StorageError("not a partition snapshot (magic)")
        (n,) = struct.unpack(">I", data[8:12])
        try:
            h = json.loads(data[12 : 12 + n])
            sizes = h["sections"]
            a = 12 + n
            b = a + int(sizes["detector"])
            c = b + int(sizes["outbox"])
            if c != len(data):
                raise ValueError("length")
            return cls(int(h["partition"]), int(h["seq"]), float(h["saved_at_s"]), str(h["owner"]),
                       data[a:b], data[b:c], list(h["dedup"]), int(h.get("consent_revision", 0)))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"partition snapshot is damaged ({type(exc).__name__})") from None

    def summary(self) -> dict[str, object]:
        """What ``cluster status`` shows (kept beside the object in the state bucket)."""
        return {"seq": self.seq, "saved_at_s": self.saved_at_s, "owner": self.owner, "bytes": 12 + len(self.detector) + len(self.outbox)}


__all__ = ["MAGIC", "Snapshot"]
