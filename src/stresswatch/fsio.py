"""The one way the project replaces a file: write a temporary file next to it, fsync it, rename
it over the target, fsync the folder.

A reader (or a machine that lost power) then sees the old file or the new one, never a
half-written one, and a rename that was reported done survives a crash (the folder's entry is
on disk too). Every file the project writes whole goes through :func:`atomic_write` or
:func:`atomic_writer`; a file written in steps (a recording, a Parquet part) is finished with
:func:`fsync_file` and put in place with :func:`commit_rename`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

DEFAULT_MODE = 0o600
"""Files are private unless the caller says otherwise (they hold health data or secrets)."""


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (a rename, a new or deleted file) durable. Best effort on
    platforms that cannot open a folder (the rename itself is still atomic there)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file someone else wrote (e.g. polars' ``write_parquet``) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_rename(src: Path | str, dst: Path | str) -> None:
    """Rename ``src`` over ``dst`` (atomic on POSIX) and make the rename durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = DEFAULT_MODE, binary: bool = False) -> Iterator[IO[Any]]:
    """``with atomic_writer(path) as fh: fh.write(...)``: the file appears, with permissions
    ``mode``, only when the block ends without an exception; otherwise nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        commit_rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes, *, mode: int = DEFAULT_MODE) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8), atomically and durably."""
    with atomic_writer(path, mode=mode, binary=isinstance(data, bytes)) as fh:
        fh.write(data)


__all__ = ["DEFAULT_MODE", "atomic_write", "atomic_writer", "commit_rename", "fsync_dir", "fsync_file"]
