"""Registered adapters: metadata in SQLite, files in a store folder; both survive restarts.

A registration copies the (already validated) files into a fresh version folder and renames it into
place before the row is committed, so a crash at any point leaves the previous state; folders no row
points at are swept at start-up.
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

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

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
    def __init__(self, root: Path):
        self.root = root
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(root / "registry.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()  # registrations copy files in worker threads
        self._sweep()

    def list(self) -> list[AdapterRecord]:
        rows = self._db.execute("SELECT * FROM adapters ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def get(self, name: str) -> AdapterRecord | None:
        row = self._db.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        return self._record(row) if row else None

    def path(self, record: AdapterRecord) -> Path:
        return self.store / record.folder

    def add(self, name: str, kind: str, num_virtual_tokens: int, files: Path, *, source: str, replace: bool,
            is_pinned: bool) -> AdapterRecord:
        """Copy `files` into the store as the new version of `name`; returns the committed record."""
        if not NAME_PATTERN.match(name):
            raise AdapterError("name", f"`{name}` must be 1-64 letters, digits, '.', '_' or '-', "
                                       f"starting with a letter or digit")
        with self._lock:
            old = self.get(name)
            if old is not None and not replace:
                raise AdapterExists("name", f"an adapter named `{name}` exists; pass replace=true to swap it")
            version = old.version + 1 if old else 1
            folder = f"{name}/v{version}-{uuid.uuid4().hex[:8]}"
            staging = self.store / f".staging-{uuid.uuid4().hex}"
            shutil.copytree(files, staging, symlinks=False)
            num_bytes = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
            (self.store / name).mkdir(exist_ok=True)
            staging.rename(self.store / folder)
            record = AdapterRecord(name=name, kind=kind, num_virtual_tokens=num_virtual_tokens, version=version, folder=folder, num_bytes=num_bytes,
                                   is_pinned=is_pinned, source=source, created_at=time.time())
            self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (name, kind, num_virtual_tokens, version, folder, num_bytes, int(is_pinned), source, record.created_at))
            if old is not None:
                shutil.rmtree(self.path(old), ignore_errors=True)
            return record

    def remove(self, name: str) -> AdapterRecord | None:
        with self._lock:
            record = self.get(name)
            if record is not None:
                self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
                shutil.rmtree(self.store / name, ignore_errors=True)
            return record

    def _sweep(self) -> None:
        """Drop files of registrations that never committed (a crash between copy and commit)."""
        kept = {record.folder for record in self.list()}
        for entry in self.store.iterdir():
            if entry.name.startswith(".staging-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir():
                for version in entry.iterdir():
                    if f"{entry.name}/{version.name}" not in kept:
                        shutil.rmtree(version, ignore_errors=True)

    @staticmethod
    def _record(row: tuple) -> AdapterRecord:
        name, kind, num_virtual_tokens, version, folder, num_bytes, is_pinned, source, created_at = row
        return AdapterRecord(name=name, kind=kind, num_virtual_tokens=num_virtual_tokens, version=version, folder=folder, num_bytes=num_bytes,
                             is_pinned=bool(is_pinned), source=source, created_at=created_at)
