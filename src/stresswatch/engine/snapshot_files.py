"""The detector snapshot's chunk files: ``<state_dir>/detector/chunk-<n>.swc``, one per chunk
of users (:meth:`Detector.chunk_state`), each with the last ingest-log sequence it holds inside
it, so a chunk and its position are replaced together by one atomic rename.

Layout: ``SWCHUNK1``, the length of a JSON header (u64 little-endian), the header
(``ingest_seq`` and, per array, name, dtype, shape and offset), then each array's bytes at a
64-byte aligned offset. A start maps the file and takes each array as a view of it: no
archive to unpack and no checksum pass (the file is written whole under a temporary name,
fsynced and renamed, so a crash leaves the old file or the new one). Reading .npz chunks
(zip members, CRCs) cost a restart at 100,000 users several seconds more.

Files, not SQLite blobs: at 100,000 users the state took 1.5-3.1 s to write as chunk files
against 10.7-11.4 s as one blob in the WAL-mode database (benchmarks/RESULTS.md), and a
save writes the state of every user who streamed.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from ..errors import StorageError
from ..fsio import atomic_writer, fsync_dir
from ..private_files import private_dir

_NAME = re.compile(r"^chunk-(\d{6,})\.swc$")
_MAGIC = b"SWCHUNK1"
_ALIGN = 64
State = dict[str, np.ndarray]


class SnapshotChunks:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def of_state_dir(cls, state_dir: Path) -> SnapshotChunks:
        return cls(state_dir / "detector")

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.swc"

    def chunks(self) -> list[int]:
        """Every stored chunk, in order (temporary files of a write cut short are ignored)."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.match(p.name)))

    def write(self, chunk: int, state: State | None, ingest_seq: int) -> None:
        """Replace ``chunk`` (atomically, durably) with ``state`` holding the ingest log up to
        ``ingest_seq``; ``state`` None: the chunk holds nobody, its file goes."""
        if state is None:
            self.remove(chunk)
            return
        private_dir(self.folder)
        arrays = [(k, v if v.flags.c_contiguous else v.copy(order="C")) for k, v in state.items()]  # 0-d stays 0-d
        entries, at = [], 0
        for k, v in arrays:
            entries.append([k, v.dtype.str, list(v.shape), at])
            at += -(-v.nbytes // _ALIGN) * _ALIGN
        head = json.dumps({"ingest_seq": int(ingest_seq), "arrays": entries}).encode()
        start = -(-(len(_MAGIC) + 8 + len(head)) // _ALIGN) * _ALIGN
        try:
            with atomic_writer(self.path(chunk), mode=0o600, binary=True) as f:
                f.write(_MAGIC + struct.pack("<Q", len(head)) + head)
                f.write(b"\0" * (start - len(_MAGIC) - 8 - len(head)))
                for _, v in arrays:
                    f.write(v.reshape(-1).view(np.uint8).data if v.nbytes else b"")
                    f.write(b"\0" * (-v.nbytes % _ALIGN))
        except OSError as exc:
            raise StorageError(f"cannot write a detector state chunk: {exc.strerror or exc}", path=str(self.folder)) from exc

    def remove(self, chunk: int) -> None:
        p = self.path(chunk)
        if p.exists():
            p.unlink()
            fsync_dir(self.folder)

    def _open(self, chunk: int) -> tuple[dict[str, object], np.ndarray, int]:
        path = self.path(chunk)
        try:
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            if bytes(mm[: len(_MAGIC)]) != _MAGIC:
                raise ValueError("not a detector state chunk")
            (n,) = struct.unpack("<Q", bytes(mm[len(_MAGIC) : len(_MAGIC) + 8]))
            head = json.loads(bytes(mm[len(_MAGIC) + 8 : len(_MAGIC) + 8 + n]))
        except (OSError, ValueError, struct.error) as exc:
            raise StorageError(f"cannot read detector state chunk {chunk}: {exc}", path=str(path)) from exc
        return head, mm, -(-(len(_MAGIC) + 8 + n) // _ALIGN) * _ALIGN

    def read(self, chunk: int, names: tuple[str, ...] | None = None) -> tuple[State, int]:
        """The chunk's state (read-only views of the mapped file; ``names``: only those arrays)
        and the ingest seq it holds."""
        head, mm, start = self._open(chunk)
        state = {}
        for name, dtype, shape, at in head["arrays"]:  # type: ignore[union-attr]
            if names is None or name in names:
                dt = np.dtype(dtype)
                count = int(np.prod(shape, dtype=np.int64))
                state[name] = mm[start + at : start + at + count * dt.itemsize].view(dt).reshape(shape)
        return state, int(head["ingest_seq"])  # type: ignore[arg-type]

    def users(self, chunk: int) -> list[str]:
        """The users a chunk holds (reads only that array of the file)."""
        return [str(u) for u in self.read(chunk, ("users",))[0]["users"].tolist()]

    def positions(self) -> list[tuple[int, int]]:
        """``(chunk, ingest_seq)`` of every stored chunk, in order (reads only the headers)."""
        return [(chunk, int(self._open(chunk)[0]["ingest_seq"])) for chunk in self.chunks()]  # type: ignore[arg-type]

    def clean(self) -> None:
        """Remove temporary files of a write that a crash cut short."""
        if self.folder.is_dir():
            for p in self.folder.glob(".chunk-*.tmp"):
                p.unlink(missing_ok=True)


__all__ = ["SnapshotChunks"]
