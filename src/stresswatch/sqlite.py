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


def connect(path: Path, *pragmas: str, any_thread: bool = False) -> sqlite3.Connection:
    """Open (creating its folder) a WAL-mode SQLite file; errors are the caller's to wrap.

    ``any_thread``: the connection may be used from threads other than the opening one (paho
    calls back on its network thread); the caller then serialises its use with a lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
