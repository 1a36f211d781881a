"""The detector snapshot's chunk files: ``<state_dir>/detector/chunk-<n>.npz``, one per chunk of
users (:meth:`Detector.chunk_state`), each with the last ingest-log sequence it holds inside it
(``ingest_seq``), so a chunk and its position are replaced together by one atomic rename.

Files, not SQLite blobs: writing a 15 MB chunk into the SQLite file (WAL, then checkpoint)
took about five times as long as a file written, fsynced and renamed on this machine
(benchmarks/RESULTS.md, "Engine state at start and at a save"), and a save writes the state
of every user who streamed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import StorageError
from ..fsio import atomic_writer, fsync_dir
from ..private_files import private_dir

_NAME = re.compile(r"^chunk-(\d{6,})\.npz$")
State = dict[str, np.ndarray]


class SnapshotChunks:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def of_state_dir(cls, state_dir: Path) -> SnapshotChunks:
        return cls(state_dir / "detector")

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.npz"

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
        try:
            with atomic_writer(self.path(chunk), mode=0o600, binary=True) as f:
                np.savez(f, **state, ingest_seq=np.array(ingest_seq, np.int64))
        except OSError as exc:
            raise StorageError(f"cannot write a detector state chunk: {exc.strerror or exc}", path=str(self.folder)) from exc

    def remove(self, chunk: int) -> None:
        p = self.path(chunk)
        if p.exists():
            p.unlink()
            fsync_dir(self.folder)

    def read(self, chunk: int) -> tuple[State, int]:
        """The chunk's state and the ingest seq it holds."""
        try:
            with np.load(self.path(chunk), allow_pickle=False) as z:
                state = {k: z[k] for k in z.files if k != "ingest_seq"}
                return state, int(z["ingest_seq"]) if "ingest_seq" in z.files else 0
        except (OSError, ValueError, KeyError) as exc:
            raise StorageError(f"cannot read detector state chunk {chunk}: {exc}", path=str(self.path(chunk))) from exc

    def users(self, chunk: int) -> list[str]:
        """The users a chunk holds (reads only that array of the file)."""
        with np.load(self.path(chunk), allow_pickle=False) as z:
            return [str(u) for u in z["users"].tolist()]

    def positions(self) -> list[tuple[int, int]]:
        """``(chunk, ingest_seq)`` of every stored chunk, in order (reads only the positions)."""
        out = []
        for chunk in self.chunks():
            with np.load(self.path(chunk), allow_pickle=False) as z:
                out.append((chunk, int(z["ingest_seq"])))
        return out

    def clean(self) -> None:
        """Remove temporary files of a write that a crash cut short."""
        if self.folder.is_dir():
            for p in self.folder.glob(".chunk-*.tmp"):
                p.unlink(missing_ok=True)


__all__ = ["SnapshotChunks"]
