"""The samples store: each user's samples as Parquet files on local disk.

Layout (``root`` defaults to ``Settings().store.state_dir``)::

    root/samples/<user>/<YYYY-MM>/part-<n>.parquet  a user's samples of one UTC month, in parts
    root/samples/.staging/<id>/...                  an import being written (never read)
    root/samples/.journal-<id>.json                 renames/deletes of a commit (rolled forward)
    root/samples/.lock                              advisory lock serialising writers

``<user>`` is the user id percent-encoded (``urllib.parse.quote(user, safe="")``, and a
leading ``.`` as ``%2E``), so any id maps to one directory name and never to a path outside
``root`` or to the store's own hidden files.

Contracts:

* **Idempotent.** A sample is identified by the whole row ``(user, time, metric, value,
  source)``: adding a row that is already stored adds nothing. The whole row, not
  ``(user, time, metric, source)``, so two different readings a source reported for the
  same instant are both kept (nothing a device said is silently dropped); exact repeats of
  a file, or of a batch re-sent over MQTT, collapse to one.
* **Atomic.** New data is first written in full to temporary files next to their targets;
  only then are they renamed over the old files (``fsio.commit_rename``: atomic on POSIX, folder fsynced). A failure
  before that point (bad input, full disk, a crash) leaves the previous files untouched.
  The list of renames is written to a journal before the first rename and every later
  store operation finishes an interrupted journal, so a crash between two renames is
  completed, not left half-done.
* **Cheap appends, bounded memory.** Incoming data is staged in chunks
  (:meth:`SampleStore.stage`) and committed one (user, month) partition at a time. Only
  rows not stored yet are written, as a new part file; to find them, only the stored rows
  inside the new data's time range are read (Parquet statistics prune the rest), so a
  live engine checkpoint costs the size of the checkpoint, not of the month. When a month
  holds :data:`COMPACT_PARTS` small parts (< :data:`SMALL_PART_ROWS` rows each) they are
  merged into one, so reads stay fast and a merge never holds more than
  ``COMPACT_PARTS * SMALL_PART_ROWS`` rows. Parts are sorted by ``time``; :meth:`read`
  returns a user's samples sorted by time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import polars as pl

from .errors import StorageError
from .fsio import atomic_write, commit_rename, fsync_dir, fsync_file
from .private_files import DIR_MODE, FILE_MODE, private_dir, private_file
from .model import SAMPLES_SCHEMA, empty_samples, validate_samples

KEY_COLUMNS: tuple[str, ...] = ("user", "time", "metric", "value", "source")
"""The columns that identify a sample (the whole row; see the module docstring)."""
COMPACT_PARTS = 8
SMALL_PART_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class AddResult:
    """What an add did: rows offered, rows newly stored, and rows already stored (or repeated)."""

    read: int
    added: int
    duplicates: int
    read_by_metric: dict[str, int] = field(default_factory=dict)
    added_by_metric: dict[str, int] = field(default_factory=dict)


def _user_dir_name(user: str) -> str:
    if not user:
        raise StorageError("empty user id")
    name = quote(user, safe="")
    # quote() keeps ".", so "." and ".." would name the store's own folders: encode a leading dot.
    return "%2E" + name[1:] if name.startswith(".") else name


def _month_key(frame: pl.DataFrame) -> pl.Expr:
    return pl.col("time").dt.strftime("%Y-%m").alias("_month")


def _rows(files: list[Path]) -> int:
    """Row count from the Parquet footers (no data pages are read)."""
    return int(pl.scan_parquet(files).select(pl.len()).collect().item())


def _write_parquet_atomic_tmp(frame: pl.DataFrame, target: Path) -> Path:
    """Write ``frame`` to a temporary file next to ``target`` and fsync it; return the temp path."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    frame.write_parquet(tmp, compression="zstd", statistics=True)
    os.chmod(tmp, FILE_MODE)
    fsync_file(tmp)
    return tmp


class SampleStore:
    """Per-user Parquet samples under ``root/samples/``. Safe for several processes (file lock)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.dir = self.root / "samples"

    @classmethod
    def from_settings(cls, settings: object | None = None) -> SampleStore:
        """The store in the configured state directory (``store.state_dir``)."""
        from .config import Settings

        s = settings if settings is not None else Settings()
        return cls(s.store.state_dir)  # type: ignore[attr-defined]

    # -- locking and the journal ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            private_dir(self.dir)
            fh = open(private_file(self.dir / ".lock"), "a+b")  # noqa: SIM115 - held for the block
        except OSError as exc:
            raise StorageError(f"cannot open the store: {exc.strerror}", path=self.dir) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._roll_forward()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def _roll_forward(self) -> None:
        """Finish a commit that was interrupted after its journal was written."""
        for journal in sorted(self.dir.glob(".journal-*.json")):
            try:
                plan = json.loads(journal.read_text())
                moves, deletes = plan["moves"], plan["deletes"]
            except (OSError, ValueError, KeyError, TypeError):
                journal.unlink(missing_ok=True)  # torn journal: written before any rename
                continue
            for tmp, final in moves:
                if Path(tmp).exists():
                    private_dir(Path(final).parent)
                    commit_rename(tmp, final)
            for old in deletes:
                Path(old).unlink(missing_ok=True)
            journal.unlink(missing_ok=True)

    # -- writing --------------------------------------------------------------------------

    def stage(self) -> StagedAdd:
        """Start an add that may arrive in many chunks; nothing is visible until ``commit()``."""
        return StagedAdd(self)

    def add(self, frame: pl.DataFrame) -> AddResult:
        """Store the rows of ``frame`` (samples schema) that are not stored yet. Atomic."""
        with self.stage() as staged:
            staged.add(frame)
            return staged.commit()

    # -- which source files were imported, with which options (import dedupe by file) ----

    def _import_log_path(self, user: str) -> Path:
        # inside the user's folder, so erasure removes it with the samples
        return self.dir / _user_dir_name(user) / "imports.json"

    def import_log(self, user: str) -> dict[str, dict[str, object]]:
        """Files imported for ``user``: SHA-256 -> ``{"file", "options", "at"}``."""
        path = self._import_log_path(user)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read the import log: {exc}", path=path) from None
        return data if isinstance(data, dict) else {}

    def record_imports(self, user: str, entries: dict[str, dict[str, object]]) -> None:
        """Add ``entries`` to ``user``'s import log (atomic replace, under the store lock)."""
        with self._locked():
            path = self._import_log_path(user)
            log = {**self.import_log(user), **entries}
            try:
                private_dir(path.parent)
                atomic_write(path, json.dumps(log, indent=1, sort_keys=True), mode=FILE_MODE)  # names of the user's files
            except OSError as exc:
                raise StorageError(f"cannot write the import log: {exc.strerror}", path=path) from None

    def erase(self, user: str) -> int:
        """Remove every stored sample of ``user`` and their files; return how many rows went."""
        with self._locked():
            udir = self.dir / _user_dir_name(user)
            if not udir.exists():
                return 0
            rows = self.count(user)
            # Rename first so a crash mid-delete never leaves a readable partial history.
            trash = self.dir / f".erase-{uuid.uuid4().hex}"
            commit_rename(udir, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return rows

    # -- reading --------------------------------------------------------------------------

    def users(self) -> list[str]:
        """User ids with stored samples, sorted."""
        if not self.dir.exists():
            return []
        return sorted(
            unquote(p.name) for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*/part-*.parquet"))
        )

    def files(self, user: str) -> list[Path]:
        """``user``'s Parquet files, month by month (each sorted by time; months do not overlap)."""
        udir = self.dir / _user_dir_name(user)
        return sorted(udir.glob("[0-9]*/part-*.parquet")) if udir.exists() else []

    def scan(self, user: str) -> pl.LazyFrame:
        """A lazy view of ``user``'s samples in time order (empty if none)."""
        files = self.files(user)
        if not files:
            return empty_samples().lazy()
        return pl.scan_parquet(files).select(list(SAMPLES_SCHEMA)).sort("time", "metric", maintain_order=True)

    def read(self, user: str) -> pl.DataFrame:
        """All samples of ``user``, sorted by time, in the samples schema."""
        try:
            return self.scan(user).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise StorageError(f"cannot read samples of this user: {str(exc).splitlines()[0]}", path=self.dir) from None

    def count(self, user: str) -> int:
        files = self.files(user)
        return _rows(files) if files else 0


@dataclass
class StagedAdd:
    """Chunks of one add, spooled to ``.staging/`` per (user, month); merged on :meth:`commit`.

    Use as a context manager: leaving the block without ``commit()`` (e.g. on a parse error)
    discards everything staged, so a failed import stores nothing.
    """

    store: SampleStore
    read: int = 0
    read_by_metric: Counter[str] = field(default_factory=Counter)
    _dir: Path | None = None
    _n: int = 0
    _done: bool = False
    _parts: dict[tuple[str, str], list[Path]] = field(default_factory=dict)

    def __enter__(self) -> StagedAdd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def _staging(self) -> Path:
        if self._dir is None:
            self._dir = self.store.dir / ".staging" / uuid.uuid4().hex
            try:
                private_dir(self._dir.parent)
                self._dir.mkdir(mode=DIR_MODE)
            except OSError as exc:
                raise StorageError(f"cannot create a staging folder: {exc.strerror}", path=self._dir) from None
        return self._dir

    def add(self, frame: pl.DataFrame) -> None:
        """Stage ``frame`` (validated against the samples schema)."""
        if self._done:
            raise StorageError("this staged add is already committed or aborted")
        if frame.height == 0:
            return
        frame = validate_samples(frame, source="samples to store")
        self.read += frame.height
        self.read_by_metric.update(dict(frame.get_column("metric").value_counts().iter_rows()))
        staging = self._staging()
        for (user, month), part in frame.with_columns(_month_key(frame)).group_by("user", "_month"):
            path = staging / f"{self._n:06d}.parquet"
            self._n += 1
            try:
                part.drop("_month").write_parquet(path, compression="lz4")
                os.chmod(path, FILE_MODE)
            except OSError as exc:
                raise StorageError(f"cannot stage samples: {exc.strerror}", path=path) from None
            self._parts.setdefault((str(user), str(month)), []).append(path)

    def commit(self) -> AddResult:
        """Merge the staged rows into the store; nothing changes unless every partition merged."""
        if self._done:
            raise StorageError("this staged add is already committed or aborted")
        store = self.store
        added = 0
        added_by_metric: Counter[str] = Counter()
        moves: list[tuple[str, str]] = []
        deletes: list[str] = []
        try:
            with store._locked():
                for (user, month), parts in sorted(self._parts.items()):
                    pdir = store.dir / _user_dir_name(user) / month
                    new = (
                        pl.concat([pl.read_parquet(p) for p in parts], how="vertical")
                        .unique(subset=list(KEY_COLUMNS), keep="first", maintain_order=True)
                        .sort("time", "metric", maintain_order=True)
                    )
                    stored = sorted(pdir.glob("part-*.parquet")) if pdir.exists() else []
                    if stored:
                        lo, hi = new.get_column("time").min(), new.get_column("time").max()
                        overlap = (
                            pl.scan_parquet(stored)
                            .filter(pl.col("time").is_between(lo, hi))
                            .select(list(KEY_COLUMNS))
                            .collect()
                        )
                        if overlap.height:
                            new = new.join(overlap.unique(), on=list(KEY_COLUMNS), how="anti", nulls_equal=True, maintain_order="left")
                    if new.height == 0:
                        continue  # nothing new: no file is touched
                    added += new.height
                    added_by_metric.update(dict(new.get_column("metric").value_counts().iter_rows()))
                    private_dir(pdir)
                    small = [p for p in stored if _rows([p]) < SMALL_PART_ROWS]
                    if new.height < SMALL_PART_ROWS and len(small) + 1 >= COMPACT_PARTS:
                        new = pl.concat([*(pl.read_parquet(p) for p in small), new], how="vertical").sort(
                            "time", "metric", maintain_order=True
                        )
                        deletes.extend(str(p) for p in small)
                    final = pdir / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
                    moves.append((str(_write_parquet_atomic_tmp(new, final)), str(final)))
                    del new
                if moves:
                    journal = store.dir / f".journal-{uuid.uuid4().hex}.json"
                    atomic_write(journal, json.dumps({"moves": moves, "deletes": deletes}), mode=FILE_MODE)
                    for tmp, final_s in moves:
                        commit_rename(tmp, final_s)
                    for old in deletes:
                        Path(old).unlink(missing_ok=True)
                    for d in {Path(f).parent for f in deletes}:
                        fsync_dir(d)
                    journal.unlink()
                    moves = []
        except OSError as exc:
            raise StorageError(f"cannot write samples: {exc.strerror or exc}", path=store.dir) from None
        except pl.exceptions.PolarsError as exc:
            raise StorageError(f"cannot merge samples: {str(exc).splitlines()[0]}", path=store.dir) from None
        finally:
            for tmp, _ in moves:  # written but never renamed: the old files stay as they were
                Path(tmp).unlink(missing_ok=True)
            self.abort()
        return AddResult(self.read, added, self.read - added, dict(self.read_by_metric), dict(added_by_metric))

    def abort(self) -> None:
        """Discard whatever was staged (idempotent)."""
        self._done = True
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._parts.clear()
