"""The samples store: every user's samples in one Parquet dataset partitioned by UTC day.

Layout (``root`` defaults to ``Settings().store.state_dir``)::

    root/samples/day=YYYY-MM-DD/part-<ns>-<id>.parquet  rows of many users of one UTC day, sorted by (user, time)
    root/samples/imports/<user>.json                    files imported for a user (erased with the user)
    root/samples/.staging/<id>/...                      an import being written (never read)
    root/samples/.journal-<id>.json                     renames/deletes of a commit (rolled forward)
    root/samples/.lock                                  advisory lock serialising writers and readers

Files written by an earlier version, ``root/samples/<user>/<YYYY-MM>/part-<n>.parquet`` (one
user each), are read as part of the dataset and moved into the day partitions by
:meth:`SampleStore.compact`. ``<user>`` in a file name is percent-encoded
(``urllib.parse.quote(user, safe="")``, a leading ``.`` as ``%2E``): any id maps to one name,
never to a path outside ``root`` or to the store's own hidden files.

Contracts:

* **A sample is the whole row** ``(user, time, metric, value, source)``: two different
  readings a source reported for the same instant are both kept, exact repeats are one
  sample. Readers (:meth:`SampleStore.read`, :meth:`~SampleStore.frames`,
  :meth:`~SampleStore.count`) return each sample once, and compaction drops exact repeats
  from the files, so a bulk :meth:`~SampleStore.append` that repeats rows (an engine
  replaying its ingest log after a crash) never shows them twice. :meth:`~SampleStore.add`
  (imports) writes only rows not stored yet and reports how many were new.
* **Bulk appends cost the rows written, not the users.** :meth:`~SampleStore.append`
  writes the rows of all users together: one file per UTC day the rows touch (one, except
  across midnight), sorted by ``(user, time)`` so Parquet statistics let a reader of one
  user skip the row groups of the others. :meth:`~SampleStore.compact` merges a day's
  small files (under :data:`SMALL_ROWS` rows) in the background, at most :data:`MERGE_ROWS`
  rows held at once.
* **Atomic and crash-safe.** Every file is written in full to a temporary name next to its
  target, fsynced, and renamed (``fsio.commit_rename``). A change of several files (an
  append across midnight, a merge, an erasure) first writes the list of renames and deletes
  to a journal; every later store operation finishes an interrupted journal. A crash
  therefore leaves each commit whole or absent: a merge killed at any step neither loses
  nor duplicates a row.
* **Erasure** rewrites every file holding the user's rows without them (new files, journal,
  renames), so nothing of the user is readable afterwards; its cost is the size of the
  files that hold the user (with many users per file: the dataset's days that the user
  appears in).
* **Several processes and threads** (the engine's writer thread, a CLI import or erasure)
  serialise on the lock file; readers hold it too, so they never see a merge half-done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from urllib.parse import quote

import polars as pl

from .errors import StorageError
from .fsio import atomic_write, commit_rename, fsync_dir, fsync_file
from .private_files import DIR_MODE, FILE_MODE, private_dir, private_file
from .model import SAMPLES_SCHEMA, empty_samples, validate_samples

KEY_COLUMNS: tuple[str, ...] = ("user", "time", "metric", "value", "source")
"""The columns that identify a sample (the whole row; see the module docstring)."""
COMPACT_PARTS = 8
"""A day still being written is merged once it has this many small files."""
SMALL_ROWS = 250_000
"""Files under this size are merged; larger ones are left alone (at 100,000 users one bulk
write is about 400,000 rows: merging those would cost CPU for no fewer reads that matter)."""
MERGE_ROWS = 2_000_000
"""A merge holds at most this many rows (its memory bound), and writes files of at most this size."""
ROW_GROUP_ROWS = 65_536
DAY_PREFIX = "day="
_SORT = ("user", "time", "metric")


@dataclass(frozen=True, slots=True)
class AddResult:
    """What an add did: rows offered, rows newly stored, and rows already stored (or repeated)."""

    read: int
    added: int
    duplicates: int
    read_by_metric: dict[str, int] = field(default_factory=dict)
    added_by_metric: dict[str, int] = field(default_factory=dict)


def user_file_name(user: str) -> str:
    """``user`` as one file name (percent-encoded, leading dot encoded)."""
    if not user:
        raise StorageError("empty user id")
    name = quote(user, safe="")
    # quote() keeps ".", so "." and ".." would name the store's own folders: encode a leading dot.
    return "%2E" + name[1:] if name.startswith(".") else name


def _day_expr() -> pl.Expr:
    return pl.col("time").dt.strftime("%Y-%m-%d").alias("_day")


def _part_name() -> str:
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


def _unique_sorted(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    lazy = frame.lazy() if isinstance(frame, pl.DataFrame) else frame
    return lazy.unique(subset=list(KEY_COLUMNS), keep="first", maintain_order=True).sort(*_SORT, maintain_order=True).collect()


class SampleStore:
    """The day-partitioned samples dataset under ``root/samples/`` (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.dir = self.root / "samples"
        self._held = threading.local()
        self._row_counts: dict[str, int] = {}  # file names are never reused: a rewrite is a new name

    @classmethod
    def from_settings(cls, settings: object | None = None) -> SampleStore:
        """The store in the configured state directory (``store.state_dir``)."""
        from .config import Settings

        s = settings if settings is not None else Settings()
        return cls(s.store.state_dir)  # type: ignore[attr-defined]

    # -- locking and the journal ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's lock (re-entrant within a thread); an interrupted commit is finished first."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        try:
            private_dir(self.dir)
            fh = open(private_file(self.dir / ".lock"), "a+b")  # noqa: SIM115 - held for the block
        except OSError as exc:
            raise StorageError(f"cannot open the store: {exc.strerror}", path=self.dir) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._held.depth = 1
            self._roll_forward()
            yield
        finally:
            self._held.depth = 0
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
            if not all(Path(tmp).exists() or Path(final).exists() for tmp, final in moves):
                journal.unlink(missing_ok=True)  # a new file is gone: keep the old ones (nothing lost)
                continue
            for tmp, final in moves:
                if Path(tmp).exists():
                    private_dir(Path(final).parent)
                    commit_rename(tmp, final)
            for old in deletes:
                Path(old).unlink(missing_ok=True)
            for d in {Path(f).parent for f in deletes}:
                fsync_dir(d)
            journal.unlink(missing_ok=True)
        for tmp in self.dir.glob("*/.part-*.tmp"):  # written, never journalled nor renamed
            tmp.unlink(missing_ok=True)

    def _write_tmp(self, frame: pl.DataFrame, final: Path) -> Path:
        """Write ``frame`` to a temporary file next to ``final`` and fsync it; return its path."""
        private_dir(final.parent)
        tmp = final.with_name(f".{final.stem}.tmp")
        frame.write_parquet(tmp, compression="zstd", statistics=True, row_group_size=ROW_GROUP_ROWS)
        os.chmod(tmp, FILE_MODE)
        fsync_file(tmp)
        self._row_counts[final.name] = frame.height
        return tmp

    @contextlib.contextmanager
    def _pending(self) -> Iterator[_Moves]:
        """A list for (temporary file, final path) pairs: on an exception before their journal
        is written, the temporary files are removed and no stored file changes; after it, they
        belong to the journal (the next store operation finishes it)."""
        moves = _Moves()
        try:
            yield moves
        except BaseException:
            if not moves.journalled:
                for tmp, _ in moves:
                    tmp.unlink(missing_ok=True)
            raise

    def _commit(self, moves: _Moves, deletes: list[Path], *, fail_after: str | None = None) -> None:
        """Rename the written temporary files into place and delete ``deletes``, all or nothing
        across a crash (journal when more than one file changes). ``fail_after``: a test's
        injected crash after that step (``journal``, ``renames``)."""
        if len(moves) == 1 and not deletes:
            commit_rename(*moves[0])
            return
        journal = self.dir / f".journal-{uuid.uuid4().hex}.json"
        atomic_write(journal, json.dumps({"moves": [[str(a), str(b)] for a, b in moves], "deletes": [str(p) for p in deletes]}))
        moves.journalled = True
        if fail_after == "journal":
            raise _InjectedCrash("journal")
        for tmp, final in moves:
            commit_rename(tmp, final)
        if fail_after == "renames":
            raise _InjectedCrash("renames")
        for old in deletes:
            old.unlink(missing_ok=True)
        for d in {p.parent for p in deletes}:
            fsync_dir(d)
        journal.unlink()

    # -- the files ------------------------------------------------------------------------

    def _day_dirs(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{DAY_PREFIX}*") if p.is_dir()) if self.dir.exists() else []

    def _day_files(self, day_dir: Path) -> list[Path]:
        return sorted(day_dir.glob("part-*.parquet"))

    def _legacy_files(self) -> list[Path]:
        """Files of the per-user layout of earlier versions (one user per file)."""
        if not self.dir.exists():
            return []
        return sorted(
            p for p in self.dir.glob("*/[0-9]*/part-*.parquet") if not p.parts[-3].startswith((".", DAY_PREFIX)) and p.parts[-3] != "imports"
        )

    def files(self) -> list[Path]:
        """Every Parquet file of the dataset (day partitions, then files of the earlier layout)."""
        return [f for d in self._day_dirs() for f in self._day_files(d)] + self._legacy_files()

    def _partitions(self) -> list[list[Path]]:
        """The files grouped so that every sample's repeats are in one group (a day, or an
        earlier version's user-month)."""
        groups = [self._day_files(d) for d in self._day_dirs()]
        legacy: dict[Path, list[Path]] = {}
        for f in self._legacy_files():
            legacy.setdefault(f.parent, []).append(f)
        return [g for g in groups if g] + list(legacy.values())

    def _rows(self, path: Path) -> int:
        """Row count from the Parquet footer (no data pages are read), cached by file name."""
        n = self._row_counts.get(path.name)
        if n is None:
            n = self._row_counts[path.name] = int(pl.scan_parquet(path).select(pl.len()).collect().item())
        return n

    # -- writing --------------------------------------------------------------------------

    def append(self, frame: pl.DataFrame) -> int:
        """Store every row of ``frame`` (samples schema) in bulk: one new file per UTC day it
        touches, whatever the number of users; returns the rows written. Repeats of stored
        rows are not looked for (readers and compaction drop them). Atomic."""
        if frame.height == 0:
            return 0
        frame = validate_samples(frame, source="samples to store")
        try:
            with self._locked(), self._pending() as moves:
                self._write_days(frame, moves)
                self._commit(moves, [])
        except OSError as exc:
            raise StorageError(f"cannot write samples: {exc.strerror or exc}", path=self.dir) from None
        return frame.height

    def _write_days(self, frame: pl.DataFrame, moves: _Moves) -> None:
        """``frame`` as one new temporary file per UTC day, sorted by (user, time), into ``moves``."""
        for (day,), part in frame.with_columns(_day_expr()).sort(*_SORT).partition_by("_day", as_dict=True).items():
            final = self.dir / f"{DAY_PREFIX}{day}" / _part_name()
            moves.append((self._write_tmp(part.drop("_day"), final), final))

    def stage(self) -> StagedAdd:
        """Start an add that may arrive in many chunks; nothing is visible until ``commit()``."""
        return StagedAdd(self)

    def add(self, frame: pl.DataFrame) -> AddResult:
        """Store the rows of ``frame`` (samples schema) that are not stored yet. Atomic."""
        with self.stage() as staged:
            staged.add(frame)
            return staged.commit()

    def compact(self, today: date | None = None, *, fail_after: str | None = None) -> int:
        """Merge small files: a day's files under :data:`SMALL_ROWS` rows are merged into as few
        files of at most :data:`MERGE_ROWS` rows as that bound allows (sorted, exact repeats
        dropped) once the day is over (``today``: the current UTC day; default the wall
        clock) or has :data:`COMPACT_PARTS` of them; files of the earlier per-user layout are moved into the day partitions.
        Returns the number of files replaced. Safe to kill at any point (journal)."""
        today_s = (today or datetime.now(timezone.utc).date()).isoformat()
        replaced = 0
        try:
            with self._locked():
                for legacy in self._legacy_files():
                    replaced += self._migrate(legacy, fail_after=fail_after)
                for day_dir in self._day_dirs():
                    replaced += self._compact_day(day_dir, closed=day_dir.name[len(DAY_PREFIX):] < today_s, fail_after=fail_after)
        except OSError as exc:
            raise StorageError(f"cannot compact samples: {exc.strerror or exc}", path=self.dir) from None
        return replaced

    def _compact_day(self, day_dir: Path, *, closed: bool, fail_after: str | None = None) -> int:
        small = [(f, self._rows(f)) for f in self._day_files(day_dir)]
        small = [(f, n) for f, n in small if n < SMALL_ROWS]
        if len(small) < 2 or (not closed and len(small) < COMPACT_PARTS):
            return 0
        groups: list[list[Path]] = [[]]
        total = 0
        for f, n in small:  # consecutive files (by name: time written) up to MERGE_ROWS rows together
            if groups[-1] and total + n > MERGE_ROWS:
                groups.append([])
                total = 0
            groups[-1].append(f)
            total += n
        replaced = 0
        for group in (g for g in groups if len(g) >= 2):
            merged = _unique_sorted(pl.scan_parquet(group))
            final = day_dir / _part_name()
            with self._pending() as moves:
                moves.append((self._write_tmp(merged, final), final))
                self._commit(moves, group, fail_after=fail_after)
            replaced += len(group)
        return replaced

    def _migrate(self, legacy: Path, *, fail_after: str | None = None) -> int:
        """Move one file of the earlier per-user layout into the day partitions (one commit)."""
        frame = pl.read_parquet(legacy)
        with self._pending() as moves:
            self._write_days(frame, moves)
            self._commit(moves, [legacy], fail_after=fail_after)
        for d in (legacy.parent, legacy.parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
        return 1

    # -- which source files were imported, with which options (import dedupe by file) ----

    def _import_log_path(self, user: str) -> Path:
        return self.dir / "imports" / f"{user_file_name(user)}.json"

    def _legacy_import_log_path(self, user: str) -> Path:
        return self.dir / user_file_name(user) / "imports.json"

    def import_log(self, user: str) -> dict[str, dict[str, object]]:
        """Files imported for ``user``: SHA-256 -> ``{"file", "options", "at"}``."""
        log: dict[str, dict[str, object]] = {}
        for path in (self._legacy_import_log_path(user), self._import_log_path(user)):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                raise StorageError(f"cannot read the import log: {exc}", path=path) from None
            if isinstance(data, dict):
                log.update(data)
        return log

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

    def erase(self, user: str, *, fail_after: str | None = None) -> int:
        """Remove every stored sample of ``user`` from every file, and their import log; return
        how many stored rows went. The files holding the user are rewritten without them (one
        journalled commit), so a crash leaves them all rewritten or none."""
        try:
            with self._locked():
                deletes: list[Path] = []
                removed = 0
                with self._pending() as moves:
                    for f in self.files():
                        n = int(pl.scan_parquet(f).filter(pl.col("user") == user).select(pl.len()).collect().item())
                        if not n:
                            continue
                        removed += n
                        deletes.append(f)
                        rest = pl.read_parquet(f).filter(pl.col("user") != user)
                        if rest.height and f.parent.name.startswith(DAY_PREFIX):
                            final = f.with_name(_part_name())
                            moves.append((self._write_tmp(rest, final), final))
                    logs = [p for p in (self._import_log_path(user), self._legacy_import_log_path(user)) if p.exists()]
                    if deletes or logs:
                        self._commit(moves, deletes + logs, fail_after=fail_after)
                legacy_dir = self.dir / user_file_name(user)
                if legacy_dir.is_dir():
                    trash = self.dir / f".erase-{uuid.uuid4().hex}"
                    commit_rename(legacy_dir, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                return removed
        except OSError as exc:
            raise StorageError(f"cannot erase samples: {exc.strerror or exc}", path=self.dir) from None

    # -- reading --------------------------------------------------------------------------

    def users(self) -> list[str]:
        """User ids with stored samples, sorted."""
        with self._locked():
            files = self.files()
            if not files:
                return []
            return sorted(pl.scan_parquet(files).select(pl.col("user").unique()).collect().get_column("user").to_list())

    def frames(self, user: str) -> Iterator[pl.DataFrame]:
        """``user``'s samples one partition (UTC day) at a time, in time order, each sample
        once; memory holds one partition. The store stays locked until the iteration ends."""
        with self._locked():
            for group in self._partitions():
                try:
                    part = _unique_sorted(pl.scan_parquet(group).filter(pl.col("user") == user).select(list(SAMPLES_SCHEMA)))
                except (pl.exceptions.PolarsError, OSError) as exc:
                    raise StorageError(f"cannot read samples of this user: {str(exc).splitlines()[0]}", path=self.dir) from None
                if part.height:
                    yield part.sort("time", "metric", maintain_order=True)

    def read(self, user: str) -> pl.DataFrame:
        """All samples of ``user``, sorted by time, in the samples schema."""
        parts = list(self.frames(user))
        return pl.concat(parts, how="vertical").sort("time", "metric", maintain_order=True) if parts else empty_samples()

    def count(self, user: str) -> int:
        """How many samples of ``user`` are stored (each once)."""
        return sum(f.height for f in self.frames(user))


class _Moves(list[tuple[Path, Path]]):
    """(temporary file, final path) pairs of one commit; ``journalled`` once its journal is on disk."""

    journalled: bool = False


class _InjectedCrash(StorageError):
    """A crash a test injects between two steps of a commit (``fail_after``)."""


@dataclass
class StagedAdd:
    """Chunks of one add, spooled to ``.staging/`` per UTC day; merged on :meth:`commit`.

    Use as a context manager: leaving the block without ``commit()`` (e.g. on a parse error)
    discards everything staged, so a failed import stores nothing.
    """

    store: SampleStore
    read: int = 0
    read_by_metric: Counter[str] = field(default_factory=Counter)
    _dir: Path | None = None
    _n: int = 0
    _done: bool = False
    _parts: dict[str, list[Path]] = field(default_factory=dict)

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
        for (day,), part in frame.with_columns(_day_expr()).partition_by("_day", as_dict=True).items():
            path = staging / f"{self._n:06d}.parquet"
            self._n += 1
            try:
                part.drop("_day").write_parquet(path, compression="lz4")
                os.chmod(path, FILE_MODE)
            except OSError as exc:
                raise StorageError(f"cannot stage samples: {exc.strerror}", path=path) from None
            self._parts.setdefault(str(day), []).append(path)

    def commit(self) -> AddResult:
        """Merge the staged rows into the store (only rows not stored yet); nothing changes
        unless every day merged."""
        if self._done:
            raise StorageError("this staged add is already committed or aborted")
        store = self.store
        added = 0
        added_by_metric: Counter[str] = Counter()
        try:
            with store._locked(), store._pending() as moves:
                touched = []
                for day, parts in sorted(self._parts.items()):
                    day_dir = store.dir / f"{DAY_PREFIX}{day}"
                    new = _unique_sorted(pl.scan_parquet(parts))
                    stored = store._day_files(day_dir) if day_dir.is_dir() else []
                    stored += [f for f in store._legacy_files() if f.parent.name == day[:7]]
                    if stored:
                        lo, hi = new.get_column("time").min(), new.get_column("time").max()
                        users = new.get_column("user").unique()
                        overlap = (
                            pl.scan_parquet(stored)
                            .filter(pl.col("user").is_in(users.implode()) & pl.col("time").is_between(lo, hi))
                            .select(list(KEY_COLUMNS))
                            .unique()
                            .collect()
                        )
                        if overlap.height:
                            new = new.join(overlap, on=list(KEY_COLUMNS), how="anti", nulls_equal=True, maintain_order="left")
                    if new.height == 0:
                        continue  # nothing new: no file is touched
                    added += new.height
                    added_by_metric.update(dict(new.get_column("metric").value_counts().iter_rows()))
                    final = day_dir / _part_name()
                    moves.append((store._write_tmp(new, final), final))
                    touched.append(day_dir)
                    del new
                if moves:
                    store._commit(moves, [])
                for day_dir in touched:
                    store._compact_day(day_dir, closed=False)
        except OSError as exc:
            raise StorageError(f"cannot write samples: {exc.strerror or exc}", path=store.dir) from None
        except pl.exceptions.PolarsError as exc:
            raise StorageError(f"cannot merge samples: {str(exc).splitlines()[0]}", path=store.dir) from None
        finally:
            self.abort()
        return AddResult(self.read, added, self.read - added, dict(self.read_by_metric), dict(added_by_metric))

    def abort(self) -> None:
        """Discard whatever was staged (idempotent)."""
        self._done = True
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._parts.clear()
