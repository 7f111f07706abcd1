"""Registered adapters: metadata in a database (SQLite or PostgreSQL), files in a store folder; both
survive restarts.

Every registration is a new, immutable version of its name (`name@N`), addressed by number or by the
sha256 of its files; identical content is stored once (`sha256/<hash>` in the store). A name serves its
newest version; aliases point at versions (several, with weights, for a traffic split). The newest
`keep_versions` of each name are kept, and any older one an alias points at or a request of this replica
uses; every change is an event in the audit log (`events`).

A registration copies the (already validated) files into the store (`stage`); the server loads them into
the engine from there, and only then is the version committed (`commit`). A crash at any point (kill -9
included) leaves the previous state; folders no version points at are swept at start-up once they are
older than `sweep_after_s`.
Replicas may share one registry (one database and one store volume): every write bumps the one row of
`registry_state` first, which serializes writers (a row lock in PostgreSQL, the write lock in SQLite)
and tells readers that their cached copy is stale; the sweep's age limit spares another replica's
registration in progress. A server keeps its copy current from a thread of its own (`watch`): woken by
PostgreSQL's NOTIFY the moment another replica commits, or polling SQLite's version row, so serving reads
the copy and never the database.
"""

from __future__ import annotations  # `list` below is also a method of AdapterRegistry

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy import Connection, delete, func, insert, select, update

from adapters.base import ADAPTER_FILES, AdapterError, AdapterGone
from server.database import RETRY_AFTER_S, Database, DatabaseUnavailable, sqlite_url
from server.database.schema import adapter_events, adapter_versions, adapters, aliases, registry_state

log = logging.getLogger(__name__)

# Matched whole (fullmatch: `$` would let a trailing newline through). Names are kept as given, looked up
# exactly, and unique ignoring case, so no two differ only by case (nor collide as folders on a
# case-insensitive filesystem).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHANNEL = "swapyard_registry"  # writers NOTIFY it; watchers LISTEN
# How often a watcher reads the version row: SQLite (no notifications) often, as the copy must follow other
# replicas within a second; PostgreSQL seldom, only in case a connection lost a notification unnoticed.
POLL_S = {"sqlite": 0.25, "postgresql": 5.0}

MAX_ALIAS_TARGETS = 8
BLOBS = "sha256"  # the store's folder of adapters by content


class AdapterRecord(BaseModel):
    """A name and the version it serves now."""

    name: str
    kind: str
    num_virtual_tokens: int  # prefix/prompt positions the adapter adds before the prompt
    version: int
    folder: str  # inside the store, relative to its root
    num_bytes: int
    is_pinned: bool
    source: str  # the server path or upload it came from
    created_at: float
    sha256: str | None = None  # of its files; None for a version registered before hashes were kept


class VersionRecord(BaseModel):
    """One immutable version of a name."""

    name: str
    version: int
    kind: str
    num_virtual_tokens: int
    sha256: str | None
    folder: str
    num_bytes: int
    source: str
    created_at: float
    created_by: str | None  # the admin key's tenant
    provenance: dict | None = None  # how a composed adapter was built


class AliasTarget(BaseModel):
    adapter: str
    version: int
    weight: float = Field(1.0, gt=0)


class AliasRecord(BaseModel):
    name: str
    targets: list[AliasTarget]
    updated_at: float
    updated_by: str | None

    def pick(self, key: str) -> AliasTarget:
        """The target for sticky key `key` (a user): the same on every replica, and shares as the weights say."""
        if len(self.targets) == 1:
            return self.targets[0]
        digest = hashlib.sha256(f"{self.name}\0{key}".encode()).digest()
        point = int.from_bytes(digest[:8]) / 2**64 * sum(t.weight for t in self.targets)
        for target in self.targets:
            point -= target.weight
            if point < 0:
                return target
        return self.targets[-1]


class AdapterEvent(BaseModel):
    seq: int
    name: str
    created_at: float
    actor: str | None
    action: str  # registered, replaced, deleted, pruned, alias_moved, alias_deleted
    version: int | None
    data: dict | None


@dataclass(frozen=True)
class RegistryView:
    """Everything a request's `model` resolves through, as of one read: replaced whole, never changed."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    versions: dict[str, dict[int, VersionRecord]] = field(default_factory=dict)  # by name, then number
    aliases: dict[str, AliasRecord] = field(default_factory=dict)


class AdapterExists(AdapterError):
    pass


def content_hash(folder: Path) -> str:
    """sha256 over the adapter's files in ADAPTER_FILES order, each framed as its name, a NUL, its size in 8
    bytes big-endian, and its bytes (so no two different file sets hash alike)."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = folder / name
        digest.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class AdapterRegistry:
    def __init__(self, root: Path, database: Database | None = None, *, sweep_after_s: float = 600.0,
                 keep_versions: int = 5):
        """`root` holds the store; the database defaults to an SQLite file beside it."""
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1 (the version a name serves)")
        self.root, self.sweep_after_s, self.keep_versions = root, sweep_after_s, keep_versions
        self.store = root / "store"
        (self.store / BLOBS).mkdir(parents=True, exist_ok=True)
        self.db = database or Database(sqlite_url(root / "registry.sqlite3"))
        self._lock = threading.RLock()  # registrations copy files in worker threads
        self._staged: Counter[str] = Counter()  # folders staged here and not yet committed or discarded
        # (version, view): replaced whole, never changed, so the event loop reads it without a lock
        self._cache: tuple[int, RegistryView] | None = None
        self._reading = threading.Lock()  # one reload at a time, so a slower older one cannot overwrite a newer
        self._closed = threading.Event()
        self._sweep()
        self._view()  # the copy a server answers from, read before it serves (the watcher reads it later)

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

    def snapshot(self) -> RegistryView:
        """Every name, version and alias, as of one read."""
        return self._view()

    def cached(self) -> dict[str, AdapterRecord]:
        """Every record by name as last read, without asking the database or taking a lock: as current as
        `watch` keeps it."""
        return self.cached_view().adapters

    def cached_view(self) -> RegistryView:
        """Names, versions and aliases as last read, without asking the database or taking a lock."""
        return self._cache[1] if self._cache is not None else RegistryView()

    def _records(self) -> dict[str, AdapterRecord]:
        return self._view().adapters

    def _view(self) -> RegistryView:
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

    def _publish(self, written: tuple[int, RegistryView]) -> None:
        """Cache a committed write's copy (read in its transaction), so that its own change is served through
        a database outage; unless a reload has meanwhile cached a later version (another replica's write)."""
        with self._reading:
            if self._cache is None or self._cache[0] < written[0]:
                self._cache = written

    def path(self, record: AdapterRecord) -> Path:
        return self.store / record.folder

    def add(self, name: str, kind: str, num_virtual_tokens: int, files: Path, *, source: str, replace: bool,
            is_pinned: bool, actor: str | None = None) -> AdapterRecord:
        """Copy `files` into the store as the new version of `name`; returns the committed record."""
        folder = self.stage(name, files, replace=replace)
        return self.commit(name, kind, num_virtual_tokens, folder, source=source, replace=replace,
                           is_pinned=is_pinned, actor=actor)[0]

    def stage(self, name: str, files: Path, *, replace: bool) -> str:
        """Copy the adapter in `files` (its config and weights: a trainer's checkpoints and metrics stay
        behind) into the store under its content hash, not yet committed (nothing serves it; the sweep
        removes it after a crash unless a version holds it). Returns the folder, relative to the store."""
        self.check_name(name, replace)
        with self._lock:
            staging = self.store / f".staging-{uuid.uuid4().hex}"
            staging.mkdir()
            for file in ADAPTER_FILES:
                shutil.copyfile(files / file, staging / file)
            folder = f"{BLOBS}/{content_hash(staging)}"
            if (self.store / folder).is_dir() and not all((self.store / folder / f).is_file() for f in ADAPTER_FILES):
                shutil.rmtree(self.store / folder, ignore_errors=True)  # a removal cut short (kill -9) left it
            try:
                staging.rename(self.store / folder)
            except OSError:  # stored already: keep one copy, fresh for the sweep until committed
                try:
                    os.utime(self.store / folder)
                    shutil.rmtree(staging, ignore_errors=True)
                except FileNotFoundError:  # another replica removed it just now: this copy takes its place
                    staging.rename(self.store / folder)
            self._staged[folder] += 1  # no removal here takes it until it is committed or discarded
        return folder

    def check_name(self, name: str, replace: bool) -> None:
        """Refuse a name of the wrong form, or taken (by another adapter or an alias, or by this one unless
        `replace`), as the registry's copy has it."""
        _check_name("name", name)
        if taken := self._taken(None, name, replace):
            raise taken

    def commit(self, name: str, kind: str, num_virtual_tokens: int, folder: str, *, source: str, replace: bool,
               is_pinned: bool, actor: str | None = None, provenance: dict | None = None,
               busy: Collection[int] = ()) -> tuple[AdapterRecord, list[VersionRecord]]:
        """Make a staged folder the newest version of `name`; returns it and the older versions it pruned
        (beyond keep_versions, unless an alias points at them or they are in `busy`: used by requests)."""
        files = self.store / folder
        try:
            num_bytes = sum((files / name).stat().st_size for name in ADAPTER_FILES)
        except FileNotFoundError:
            num_bytes = -1  # refused below, with the writers' lock held
        sha256 = folder.removeprefix(f"{BLOBS}/") if folder.startswith(f"{BLOBS}/") else None
        with self._lock:
            try:
                with self.db.write() as connection:
                    self._bump(connection)  # other replicas' registrations wait here
                    if taken := self._taken(connection, name, replace):
                        raise taken
                    if num_bytes < 0 or not all((files / name).is_file() for name in ADAPTER_FILES):
                        # removed by another replica's deletion since it was staged
                        raise AdapterError("name", f"`{name}`'s files left the store while it was registered; "
                                                   f"register it again")
                    old = _read(connection, name)
                    last = connection.execute(select(func.max(adapter_events.c.version))
                                              .where(adapter_events.c.name == name)).scalar()
                    record = AdapterRecord(name=name, kind=kind, num_virtual_tokens=num_virtual_tokens,
                                           version=max(old.version if old else 0, last or 0) + 1, folder=folder,
                                           num_bytes=num_bytes, is_pinned=is_pinned, source=source,
                                           created_at=time.time(), sha256=sha256)
                    values = record.model_dump()
                    connection.execute(update(adapters).where(adapters.c.name == name).values(values) if old
                                       else insert(adapters).values(values))
                    connection.execute(insert(adapter_versions).values(
                        name=name, version=record.version, kind=kind, num_virtual_tokens=num_virtual_tokens,
                        sha256=sha256, folder=folder, num_bytes=num_bytes, source=source,
                        created_at=record.created_at, created_by=actor,
                        provenance=json.dumps(provenance) if provenance is not None else None))
                    _event(connection, name, actor, "replaced" if old else "registered", record.version,
                           {"sha256": sha256, "source": source, **({"provenance": provenance} if provenance else {})})
                    pruned = self._prune(connection, name, record.version, busy, actor)
                    written = _load(connection)
            except BaseException:
                self.discard(folder)
                raise
            self._staged -= Counter({folder: 1})
            self._publish(written)
        self._remove_files([version.folder for version in pruned])
        return record, pruned

    def _prune(self, connection: Connection, name: str, newest: int, busy: Collection[int],
               actor: str | None) -> list[VersionRecord]:
        """Drop `name`'s versions past keep_versions that no alias points at and no request uses."""
        kept = set(busy) | {t.version for alias in _aliases(connection).values() for t in alias.targets
                            if t.adapter == name}
        rows = connection.execute(select(adapter_versions).where(adapter_versions.c.name == name)
                                  .order_by(adapter_versions.c.version.desc())).mappings().all()
        pruned = [_version(row) for row in rows[self.keep_versions:] if row["version"] not in kept | {newest}]
        for version in pruned:
            connection.execute(delete(adapter_versions).where(adapter_versions.c.name == name,
                                                              adapter_versions.c.version == version.version))
            _event(connection, name, actor, "pruned", version.version, {"sha256": version.sha256})
        return pruned

    def discard(self, folder: str) -> None:
        """Remove a staged folder that will not be committed (unless a version holds the same content); with
        the database down, which is unknown: the sweep removes it later."""
        with self._lock:
            self._staged -= Counter({folder: 1})
        try:
            self._remove_files([folder])
        except DatabaseUnavailable:
            log.warning("left %s for the start-up sweep: the database did not answer", folder)

    def _remove_files(self, folders: list[str]) -> None:
        """Remove the folders no version holds, holding the writers' lock: a registration that staged the same
        content meanwhile finds its files gone when it commits and is refused, never left without files."""
        if not folders:
            return
        with self._lock, self.db.write() as connection:  # and no registration here stages meanwhile
            _lock_writers(connection)
            held = set(connection.execute(select(adapter_versions.c.folder)
                                          .where(adapter_versions.c.folder.in_(folders))).scalars())
            for folder in set(folders) - held - set(self._staged):
                shutil.rmtree(self.store / folder, ignore_errors=True)

    def _taken(self, connection: Connection | None, name: str, replace: bool) -> AdapterExists | None:
        """Why `name` may not be registered: another adapter or an alias has it (in any case), or it exists and
        this is not a replace. Without a connection: as the cached registry has it."""
        if connection is None:
            view = self._view()
            names = [known for known in view.adapters if known.lower() == name.lower()]
            alias = next((known for known in view.aliases if known.lower() == name.lower()), None)
        else:
            names = connection.execute(select(adapters.c.name).where(func.lower(adapters.c.name) == name.lower())
                                       ).scalars().all()
            alias = connection.execute(select(aliases.c.name).where(func.lower(aliases.c.name) == name.lower())
                                       ).scalar()
        if alias is not None:
            return AdapterExists("name", f"`{alias}` is an alias (names are compared ignoring case)")
        if any(taken != name or not replace for taken in names):
            return AdapterExists("name", f"an adapter named `{name}` (ignoring case) exists; pass replace=true "
                                         f"to swap an adapter of exactly this name")
        return None

    def remove(self, name: str, actor: str | None = None) -> tuple[AdapterRecord | None, list[VersionRecord]]:
        """Delete `name` and every version of it; returns its record and versions (None, [] if unknown). An
        adapter an alias points at stays (409 naming the alias)."""
        with self._lock:
            with self.db.write() as connection:
                self._bump(connection)
                record = _read(connection, name)
                if record is not None:
                    if pointing := sorted(a.name for a in _aliases(connection).values()
                                          if any(t.adapter == name for t in a.targets)):
                        raise AdapterExists("name", f"alias `{pointing[0]}` points at `{name}`; move or delete "
                                                    f"the alias first")
                    versions = [_version(row) for row in connection.execute(
                        select(adapter_versions).where(adapter_versions.c.name == name)).mappings()]
                    connection.execute(delete(adapters).where(adapters.c.name == name))
                    connection.execute(delete(adapter_versions).where(adapter_versions.c.name == name))
                    _event(connection, name, actor, "deleted", record.version, None)
                else:
                    versions = []
                written = _load(connection)
            self._publish(written)
        self._remove_files([version.folder for version in versions])
        return record, versions

    def set_alias(self, alias: str, targets: list[AliasTarget], actor: str | None = None) -> AliasRecord:
        """Point `alias` at `targets` (versions, with weights), atomically; each adapter involved, before or
        after, gets an `alias_moved` event."""
        _check_name("alias", alias)
        if not 1 <= len(targets) <= MAX_ALIAS_TARGETS:
            raise AdapterError("targets", f"an alias points at 1 to {MAX_ALIAS_TARGETS} versions")
        with self._lock:
            with self.db.write() as connection:
                self._bump(connection)
                if taken := connection.execute(select(adapters.c.name).where(
                        func.lower(adapters.c.name) == alias.lower())).scalar():
                    raise AdapterExists("alias", f"`{alias}` is an adapter's name (`{taken}`, ignoring case)")
                clash = connection.execute(select(aliases.c.name).where(
                    func.lower(aliases.c.name) == alias.lower(), aliases.c.name != alias)).scalar()
                if clash:
                    raise AdapterExists("alias", f"alias `{clash}` exists (names are compared ignoring case)")
                for i, target in enumerate(targets):
                    if connection.execute(select(adapter_versions.c.version).where(
                            adapter_versions.c.name == target.adapter,
                            adapter_versions.c.version == target.version)).scalar() is None:
                        raise AdapterGone(f"targets[{i}].model", f"`{target.adapter}@{target.version}` is not a "
                                                           f"registered version")
                old = _aliases(connection).get(alias)
                record = AliasRecord(name=alias, targets=targets, updated_at=time.time(), updated_by=actor)
                values = {"targets": json.dumps([t.model_dump() for t in targets]), "updated_at": record.updated_at,
                          "updated_by": actor}
                connection.execute(update(aliases).where(aliases.c.name == alias).values(values) if old
                                   else insert(aliases).values(name=alias, **values))
                self._alias_events(connection, alias, old, record, actor)
                written = _load(connection)
            self._publish(written)
        return record

    def delete_alias(self, alias: str, actor: str | None = None) -> AliasRecord | None:
        with self._lock:
            with self.db.write() as connection:
                self._bump(connection)
                old = _aliases(connection).get(alias)
                if old is not None:
                    connection.execute(delete(aliases).where(aliases.c.name == alias))
                    self._alias_events(connection, alias, old, None, actor)
                written = _load(connection)
            self._publish(written)
        return old

    @staticmethod
    def _alias_events(connection: Connection, alias: str, old: AliasRecord | None, new: AliasRecord | None,
                      actor: str | None) -> None:
        def targets(record: AliasRecord | None) -> list[dict]:
            return [t.model_dump() for t in record.targets] if record is not None else []

        for name in sorted({t.adapter for record in (old, new) if record is not None for t in record.targets}):
            _event(connection, name, actor, "alias_moved" if new is not None else "alias_deleted", None,
                   {"alias": alias, "from": targets(old), "to": targets(new)})

    def events(self, name: str, after: int = 0, limit: int = 100) -> list[AdapterEvent]:
        """`name`'s audit log, oldest first, from after event `after` (the database, not the copy)."""
        with self.db.read() as connection:
            rows = connection.execute(select(adapter_events).where(adapter_events.c.name == name,
                                                                   adapter_events.c.seq > after)
                                      .order_by(adapter_events.c.seq).limit(limit)).mappings().all()
        return [AdapterEvent(**{**row, "data": json.loads(row["data"]) if row["data"] else None}) for row in rows]

    def _bump(self, connection: Connection) -> None:
        """Move the registry's version, and wake every replica's watcher once the write commits; in a write
        transaction, this takes the writers' lock first."""
        connection.execute(update(registry_state).values(version=registry_state.c.version + 1))
        self.db.notify(connection, CHANNEL)

    def _sweep(self) -> None:
        """Drop files of registrations that never committed (a crash between copy and commit), holding the
        writers' lock: another replica's commit of the same content waits, and then finds its files or not."""
        cutoff = time.time() - self.sweep_after_s
        with self.db.write() as connection:
            _lock_writers(connection)
            kept = set(connection.execute(select(adapter_versions.c.folder)).scalars())
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


def _load(connection: Connection, version: int | None = None) -> tuple[int, RegistryView]:
    """(version, every name, version and alias); the version read first, so the rows are at least as new as
    it says."""
    if version is None:
        version = connection.execute(select(registry_state.c.version)).scalar_one()
    versions: dict[str, dict[int, VersionRecord]] = {}
    for row in connection.execute(select(adapter_versions)).mappings():
        versions.setdefault(row["name"], {})[row["version"]] = _version(row)
    records = {row["name"]: AdapterRecord(**row) for row in connection.execute(select(adapters)).mappings()}
    return version, RegistryView(records, versions, _aliases(connection))


def _version(row) -> VersionRecord:
    return VersionRecord(**{**row, "provenance": json.loads(row["provenance"]) if row["provenance"] else None})


def _aliases(connection: Connection) -> dict[str, AliasRecord]:
    return {row["name"]: AliasRecord(name=row["name"], targets=json.loads(row["targets"]), updated_at=row["updated_at"],
                                     updated_by=row["updated_by"])
            for row in connection.execute(select(aliases)).mappings()}


def _event(connection: Connection, name: str, actor: str | None, action: str, version: int | None,
           data: dict | None) -> None:
    connection.execute(insert(adapter_events).values(name=name, created_at=time.time(), actor=actor, action=action,
                                                     version=version, data=json.dumps(data) if data else None))


def _check_name(field: str, name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise AdapterError(field, f"`{name}` must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                  f"or digit")


def _lock_writers(connection: Connection) -> None:
    """Take the writers' lock in a write transaction (SQLite's BEGIN IMMEDIATE holds it already)."""
    connection.execute(select(registry_state.c.version).with_for_update())


def _read(connection: Connection, name: str) -> AdapterRecord | None:
    """The row as the database has it now (inside a write transaction: no cache)."""
    row = connection.execute(select(adapters).where(adapters.c.name == name)).mappings().first()
    return AdapterRecord(**row) if row else None
