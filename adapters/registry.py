"""Registered adapters: metadata in a database (SQLite or PostgreSQL), files in a store folder; both
survive restarts.

A registration copies the (already validated) files into a fresh version folder and renames it into
place (`stage`); the server loads it into the engine from there, and only then is the row committed
(`commit`) and the replaced version's files removed. A crash at any point (kill -9 included) leaves the
previous state; folders no row points at are swept at start-up once they are older than `sweep_after_s`.
Replicas may share one registry (one database and one store volume): every write bumps the one row of
`registry_state` first, which serializes writers (a row lock in PostgreSQL, the write lock in SQLite)
and tells readers that their cached copy is stale; the sweep's age limit spares another replica's
registration in progress. A server keeps its copy current from a thread of its own (`watch`): woken by
PostgreSQL's NOTIFY the moment another replica commits, or polling SQLite's version row, so serving reads
the copy and never the database.
"""

import logging
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import Connection, delete, func, insert, select, update

from adapters.base import ADAPTER_FILES, AdapterError
from server.database import RETRY_AFTER_S, Database, DatabaseUnavailable, sqlite_url
from server.database.schema import adapters, registry_state

log = logging.getLogger(__name__)

# Matched whole (fullmatch: `$` would let a trailing newline through). Names are kept as given, looked up
# exactly, and unique ignoring case, so no two differ only by case (nor collide as folders on a
# case-insensitive filesystem).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHANNEL = "swapyard_registry"  # writers NOTIFY it; watchers LISTEN
# How often a watcher reads the version row: SQLite (no notifications) often, as the copy must follow other
# replicas within a second; PostgreSQL seldom, only in case a connection lost a notification unnoticed.
POLL_S = {"sqlite": 0.25, "postgresql": 5.0}

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
    def __init__(self, root: Path, database: Database | None = None, *, sweep_after_s: float = 600.0):
        """`root` holds the store; the database defaults to an SQLite file beside it."""
        self.root, self.sweep_after_s = root, sweep_after_s
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.db = database or Database(sqlite_url(root / "registry.sqlite3"))
        self._lock = threading.Lock()  # registrations copy files in worker threads
        # (version, records): replaced whole, never changed, so the event loop reads it without a lock
        self._cache: tuple[int, dict[str, AdapterRecord]] | None = None
        self._reading = threading.Lock()  # one reload at a time, so a slower older one cannot overwrite a newer
        self._closed = threading.Event()
        self._sweep()

    def watch(self) -> None:
        """Keep the cached copy current from now on, in a thread of its own, until close()."""
        threading.Thread(target=self._watch, name="registry-watch", daemon=True).start()

    def _watch(self) -> None:
        poll_s = POLL_S[self.db.url.get_backend_name()]
        try:
            while not self._closed.is_set():
                try:
                    self.db.wait_for_change(CHANNEL, poll_s)
                    self._records()
                except DatabaseUnavailable as exc:  # serving goes on from the copy; try again shortly
                    log.debug("watching the registry: %s", exc)
                    self._closed.wait(RETRY_AFTER_S)
        finally:
            self.db.stop_listening()

    def close(self) -> None:
        self._closed.set()

    def list(self) -> list[AdapterRecord]:
        return sorted(self._records().values(), key=lambda record: record.name)

    def get(self, name: str) -> AdapterRecord | None:
        return self._records().get(name)

    def snapshot(self) -> dict[str, AdapterRecord]:
        """Every record by name, as of one read."""
        return self._records()

    def cached(self) -> dict[str, AdapterRecord]:
        """Every record by name as last read, without asking the database or taking a lock: as current as
        `watch` keeps it."""
        return self._cache[1] if self._cache is not None else {}

    def _records(self) -> dict[str, AdapterRecord]:
        """Every row, read again only when the registry's version moved (a write here or on another
        replica), so the hot path reads one row. While the database is down, the last copy serves."""
        if self._cache is not None and not self.db.is_up():
            return self._cache[1]
        try:
            with self._reading, self.db.read() as connection:
                version = connection.execute(select(registry_state.c.version)).scalar_one()
                if self._cache is None or self._cache[0] != version:
                    self._cache = _load(connection, version)
        except DatabaseUnavailable:
            if self._cache is None:
                raise
            log.warning("the registry database is unavailable; serving the registrations read before")
        return self._cache[1]

    def _publish(self, written: tuple[int, dict[str, AdapterRecord]]) -> None:
        """Cache a committed write's copy (read in its transaction), so that its own change is served through
        a database outage; unless a reload has meanwhile cached a later version (another replica's write)."""
        with self._reading:
            if self._cache is None or self._cache[0] < written[0]:
                self._cache = written

    def path(self, record: AdapterRecord) -> Path:
        return self.store / record.folder

    def add(self, name: str, kind: str, num_virtual_tokens: int, files: Path, *, source: str, replace: bool,
            is_pinned: bool) -> AdapterRecord:
        """Copy `files` into the store as the new version of `name`; returns the committed record."""
        folder = self.stage(name, files, replace=replace)
        return self.commit(name, kind, num_virtual_tokens, folder, source=source, replace=replace,
                           is_pinned=is_pinned)

    def stage(self, name: str, files: Path, *, replace: bool) -> str:
        """Copy the adapter in `files` (its config and weights: a trainer's checkpoints and metrics stay
        behind) into a fresh version folder of `name`, not yet committed (nothing serves it; the sweep
        removes it after a crash). Returns the folder, relative to the store."""
        if not NAME_PATTERN.fullmatch(name):
            raise AdapterError("name", f"`{name}` must be 1-64 letters, digits, '.', '_' or '-', "
                                       f"starting with a letter or digit")
        if self._taken(None, name, replace):
            raise _exists(name)
        with self._lock:
            staging = self.store / f".staging-{uuid.uuid4().hex}"
            staging.mkdir()
            for file in ADAPTER_FILES:
                shutil.copyfile(files / file, staging / file)
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
                with self.db.write() as connection:
                    self._bump(connection)  # other replicas' registrations wait here
                    if self._taken(connection, name, replace):
                        raise _exists(name)
                    old = _read(connection, name)
                    record = AdapterRecord(name=name, kind=kind, num_virtual_tokens=num_virtual_tokens,
                                           version=old.version + 1 if old else 1, folder=folder,
                                           num_bytes=num_bytes, is_pinned=is_pinned, source=source,
                                           created_at=time.time())
                    values = record.model_dump()
                    connection.execute(update(adapters).where(adapters.c.name == name).values(values) if old
                                       else insert(adapters).values(values))
                    written = _load(connection)
            except BaseException:
                self.discard(folder)
                raise
            self._publish(written)
            if old is not None:
                shutil.rmtree(self.path(old), ignore_errors=True)
            return record

    def discard(self, folder: str) -> None:
        """Remove a staged folder that will not be committed."""
        shutil.rmtree(self.store / folder, ignore_errors=True)

    def _taken(self, connection: Connection | None, name: str, replace: bool) -> bool:
        """Whether `name` may not be registered: another adapter has it (in any case), or it exists and
        this is not a replace. Without a connection: as the cached registry has it."""
        if connection is None:
            names = [known for known in self._records() if known.lower() == name.lower()]
        else:
            names = connection.execute(select(adapters.c.name).where(func.lower(adapters.c.name) == name.lower())
                                       ).scalars().all()
        return any(taken != name or not replace for taken in names)

    def remove(self, name: str) -> AdapterRecord | None:
        with self._lock:
            with self.db.write() as connection:
                self._bump(connection)
                record = _read(connection, name)
                if record is not None:
                    connection.execute(delete(adapters).where(adapters.c.name == name))
                written = _load(connection)
            self._publish(written)
        if record is not None:
            shutil.rmtree(self.store / name, ignore_errors=True)
        return record

    def _bump(self, connection: Connection) -> None:
        """Move the registry's version, and wake every replica's watcher once the write commits; in a write
        transaction, this takes the writers' lock first."""
        connection.execute(update(registry_state).values(version=registry_state.c.version + 1))
        self.db.notify(connection, CHANNEL)

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


def _load(connection: Connection, version: int | None = None) -> tuple[int, dict[str, AdapterRecord]]:
    """(version, every record by name); the version read first, so the rows are at least as new as it says."""
    if version is None:
        version = connection.execute(select(registry_state.c.version)).scalar_one()
    rows = connection.execute(select(adapters)).mappings()
    return version, {row["name"]: AdapterRecord(**row) for row in rows}


def _read(connection: Connection, name: str) -> AdapterRecord | None:
    """The row as the database has it now (inside a write transaction: no cache)."""
    row = connection.execute(select(adapters).where(adapters.c.name == name)).mappings().first()
    return AdapterRecord(**row) if row else None


def _exists(name: str) -> AdapterExists:
    return AdapterExists("name", f"an adapter named `{name}` (ignoring case) exists; pass replace=true to swap "
                                 f"an adapter of exactly this name")
