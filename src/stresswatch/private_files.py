"""Files and folders private to the account that runs stresswatch: folders 0700, files 0600.

The stores hold consent histories, alert histories and heart data: no other account on the
machine may read them, whatever the process umask (docs/BROKER.md, "Files").
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents as 0700 folders (an existing folder is left as it is)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)
    return path


def tighten(path: Path, mode: int = FILE_MODE) -> None:
    """Drop group and other permissions from an existing file or folder we own."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        st = path.stat()
        if st.st_mode & 0o077:
            os.chmod(path, st.st_mode & mode & 0o777)


def private_file(path: Path) -> Path:
    """Create ``path`` (empty) as a 0600 file if it does not exist; tighten it if it does."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
    except FileExistsError:
        tighten(path)
    return path
