"""Registered adapters: metadata in SQLite, files in a store folder; both survive restarts.

A registration copies the (already validated) files into a fresh version folder and renames it into
place (`stage`); the server loads it into the engine from there, and only then is the row committed
(`commit`) and the replaced version's files removed. A crash at any point (kill -9 included) leaves the
previous state; folders no row points at are swept at start-up once they are older than `sweep_after_s`.
Replicas may share one registry folder (a volume): the version is allotted inside an SQLite write
transaction, and the sweep's age limit spares another replica's registration in progress.
"""

import re
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from adapters.base import AdapterError

# Matched whole (fullmatch: `$` would let a trailing newline through). Names are kept as given, looked up
# exactly, and unique ignoring case, so no two differ only by case (nor collide as folders on a
# case-insensitive filesystem).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    num_virtual_tokens INTEGER NOT NULL,
    version INTEGER NOT NULL,
    folder TEXT NOT NULL,
    num_bytes INTEGER NOT NULL,
    is_pinned INTEGER NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


class AdapterRecord(BaseModel):
    name: str
    kind: str
    num_virtual_tokens: int  # prefix/prompt positions the adapter adds before the prompt
    version: int
    folder: str  # inside the store, relative to its root
    num_bytes: int
    is_pinned: bool
    source: str  # the server path or upload it came from
    created_at: float


class AdapterExists(AdapterError):
    pass


class AdapterRegistry:
    def __init__(self, root: Path, *, sweep_after_s: float = 600.0):
        self.root, self.sweep_after_s = root, sweep_after_s
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(root / "registry.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()  # registrations copy files in worker threads
        self._writes = 0  # this process's commits, which SQLite's data_version does not count
        self._cache: tuple[tuple[int, int], dict[str, AdapterRecord]] | None = None
        self._sweep()

    def list(self) -> list[AdapterRecord]:
        return sorted(self._records().values(), key=lambda record: record.name)

    def get(self, name: str) -> AdapterRecord | None:
        return self._records().get(name)

    def _records(self) -> dict[str, AdapterRecord]:
        """Every row, read again only after a change: this process's writes, or another replica's (SQLite's
        data_version moves when another connection commits), so the hot path reads no table."""
        key = (self._db.execute("PRAGMA data_version").fetchone()[0], self._writes)
        cached = self._cache
        if cached is None or cached[0] != key:
            rows = self._db.execute("SELECT * FROM adapters").fetchall()
            cached = self._cache = (key, {row[0]: self._record(row) for row in rows})
        return cached[1]

    def _read(self, name: str) -> AdapterRecord | None:
        """The row as the database has it now (inside a write transaction: no cache)."""
        row = self._db.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        return self._record(row) if row else None

    def path(self, record: AdapterRecord) -> Path:
        return self.store / record.folder

    def add(self, name: str, kind: str, num_virtual_tokens: int, files: Path, *, source: str, replace: bool,
            is_pinned: bool) -> AdapterRecord:
        """Copy `files` into the store as the new version of `name`; returns the committed record."""
        folder = self.stage(name, files, replace=replace)
        return self.commit(name, kind, num_virtual_tokens, folder, source=source, replace=replace,
                           is_pinned=is_pinned)

    def stage(self, name: str, files: Path, *, replace: bool) -> str:
        """Copy `files` into a fresh version folder of `name`, not yet committed (nothing serves it; the
        sweep removes it after a crash). Returns the folder, relative to the store."""
        if not NAME_PATTERN.fullmatch(name):
            raise AdapterError("name", f"`{name}` must be 1-64 letters, digits, '.', '_' or '-', "
                                       f"starting with a letter or digit")
        if self._taken(name, replace):
            raise _exists(name)
        with self._lock:
            staging = self.store / f".staging-{uuid.uuid4().hex}"
            shutil.copytree(files, staging, symlinks=False)
            folder = f"{name}/{uuid.uuid4().hex}"
            (self.store / name).mkdir(exist_ok=True)
            staging.rename(self.store / folder)
        return folder

    def commit(self, name: str, kind: str, num_virtual_tokens: int, folder: str, *, source: str, replace: bool,
               is_pinned: bool) -> AdapterRecord:
        """Make a staged folder the served version of `name`, then remove the version it replaces."""
        num_bytes = sum(f.stat().st_size for f in (self.store / folder).rglob("*") if f.is_file())
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # other replicas' registrations wait here
                if self._taken(name, replace):
                    raise _exists(name)
                old = self._read(name)
                record = AdapterRecord(name=name, kind=kind, num_virtual_tokens=num_virtual_tokens,
                                       version=old.version + 1 if old else 1, folder=folder, num_bytes=num_bytes,
                                       is_pinned=is_pinned, source=source, created_at=time.time())
                self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 tuple(record.model_dump().values()))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self.discard(folder)
                raise
            finally:  # a read meanwhile (same connection) may have cached the row before COMMIT or ROLLBACK
                self._writes += 1
            if old is not None:
                shutil.rmtree(self.path(old), ignore_errors=True)
            return record

    def discard(self, folder: str) -> None:
        """Remove a staged folder that will not be committed."""
        shutil.rmtree(self.store / folder, ignore_errors=True)

    def _taken(self, name: str, replace: bool) -> bool:
        """Whether `name` may not be registered: another adapter has it (in any case), or it exists and
        this is not a replace."""
        rows = self._db.execute("SELECT name FROM adapters WHERE lower(name) = lower(?)", (name,)).fetchall()
        return any(row[0] != name or not replace for row in rows)

    def remove(self, name: str) -> AdapterRecord | None:
        with self._lock:
            record = self._read(name)
            if record is not None:
                self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
                self._writes += 1
                shutil.rmtree(self.store / name, ignore_errors=True)
            return record

    def _sweep(self) -> None:
        """Drop files of registrations that never committed (a crash between copy and commit)."""
        kept = {record.folder for record in self.list()}
        cutoff = time.time() - self.sweep_after_s
        for entry in self.store.iterdir():
            if entry.name.startswith(".staging-"):
                stale = [entry]
            elif entry.is_dir():
                stale = [version for version in entry.iterdir() if f"{entry.name}/{version.name}" not in kept]
            else:
                continue
            for folder in stale:
                if folder.stat().st_mtime <= cutoff:
                    shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _record(row: tuple) -> AdapterRecord:
        return AdapterRecord(**dict(zip(AdapterRecord.model_fields, row)))


def _exists(name: str) -> AdapterExists:
    return AdapterExists("name", f"an adapter named `{name}` (ignoring case) exists; pass replace=true to swap "
                                 f"an adapter of exactly this name")
