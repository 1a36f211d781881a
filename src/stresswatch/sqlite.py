"""The one way the project opens SQLite: consent ledger, alert outbox, the worker's seen ids,
the companion's ingest buffer.

Connections are in autocommit mode (``isolation_level=None``) with WAL, so a statement
outside :func:`transaction` commits on its own and readers in other processes never block
the engine's writes.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from .private_files import private_dir, private_file, tighten


def connect(path: Path, *pragmas: str, any_thread: bool = False) -> sqlite3.Connection:
    """Open (creating its folder, 0700) a WAL-mode SQLite file, private to this account: the
    file is created 0600 before SQLite opens it, and SQLite gives its ``-wal`` and ``-shm``
    files the database file's mode. Errors are the caller's to wrap.

    ``any_thread``: the connection may be used from threads other than the opening one (paho
    calls back on its network thread); the caller then serialises its use with a lock.
    """
    path = Path(path) if str(path) != ":memory:" else path
    if str(path) != ":memory:":
        private_dir(path.parent)
        private_file(path)
        for extra in ("-wal", "-shm", "-journal"):  # left 0644 by an older version
            tighten(path.with_name(path.name + extra))
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=not any_thread)
    db.execute("PRAGMA journal_mode=WAL")
    for pragma in pragmas:
        db.execute(f"PRAGMA {pragma}")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One SQLite transaction (BEGIN IMMEDIATE ... COMMIT); nested calls join the outer one."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
