"""Adapter names to registered versions, registration and aliases. The engine owns residency.

A request's `model` is resolved here to an AdapterRef (name, version, files) from the registry's copy, which
its watcher thread keeps current (within a second of another replica's change): a warm request touches no
lock and no database, aliases and traffic splits included. `name` is served by its newest version (a newer
one registered meanwhile answers a request queued for an older one); `name@N`, `name@sha256:HEX` and aliases
pin a version, which the engine serves as an adapter of its own (`name@N`), so nothing else answers for it.
Which versions are on the device, which wait for a slot and when a replaced version's memory frees is the
engine's alone (server/engine/residency.py); this module only tells it what was
registered, deleted, merged or unmerged.
"""

import asyncio
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from adapters.base import AdapterError, AdapterGone, AdapterLimit
from adapters.compose import Source, check_sources, compose_loras
from adapters.registry import (AdapterEvent, AdapterRecord, AdapterRegistry, AliasRecord, AliasTarget, RegistryView,
                               VersionRecord)
from server import database
from server.engine.base import Engine
from server.engine.residency import AdapterRef
from server.metrics import MERGED_ADAPTER, forget_model, forget_version

SHA256_PIN = "sha256:"
MIN_SHA256_PREFIX = 12  # hex digits a `name@sha256:` pin must give
MAX_VERSION_DIGITS = 9
# A version resolved this recently is not pruned: its request may still be between resolving and running (a
# grammar compiles for up to --max-grammar-compile-s) when a registration prunes.
RESOLVED_HOLD_S = 60.0


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, engine: Engine, base_model: str, base_path: Path, *,
                 max_pinned: int):
        self.registry, self.engine, self.base_model, self.max_pinned = registry, engine, base_model, max_pinned
        self.base_path = base_path  # the base model's folder, which composing LoRAs loads
        self._composing = asyncio.Lock()  # one composition at a time: each holds a float32 copy of the base
        self._reading_registry: asyncio.Future | None = None  # the registry read under way
        self._next_registry_read: asyncio.Future | None = None  # the one after it, shared by calls meanwhile
        self._swap = asyncio.Lock()  # one merge or unmerge at a time (loads never wait for it)
        self._in_use: Counter[tuple[str, int]] = Counter()  # (name, version) of requests running here
        self._resolved_at: dict[tuple[str, int], float] = {}  # (name, version) -> when a request last resolved it
        registry.watch()

    def close(self) -> None:
        self.registry.close()

    @property
    def merged(self) -> str | None:
        """The LoRA folded into the base weights, as the engine (its one owner) says."""
        return self.engine.merged

    def records(self) -> dict[str, AdapterRecord]:
        return self.registry.cached()

    async def get(self, name: str) -> AdapterRecord | None:
        """`name`'s record: from the registry's copy when it knows the name, else read afresh, as another
        replica may have registered it a moment ago (so a client that registered through one replica finds it
        through any other at once)."""
        if (record := self.registry.cached().get(name)) is not None:
            return record
        return (await self._read()).adapters.get(name)

    async def resolve(self, model: str, user: str | None = None) -> tuple[AdapterRef, str] | None:
        """The version `model` names and the name metrics give it: `name` (its newest), `name@N`,
        `name@sha256:HEX` (12 or more digits: the newest version with that content; labelled `name@N`) or an
        alias, whose split picks by `user` (the same version for one user, on every replica; a random one
        without). None when it names nothing registered."""
        found = self._lookup(self.registry.cached_view(), model, user)
        if found is None:
            found = self._lookup(await self._read(), model, user)
        if found is not None:
            ref = found[0]
            self._resolved_at[ref.adapter, ref.version] = time.monotonic()
        return found

    def _lookup(self, view: RegistryView, model: str, user: str | None) -> tuple[AdapterRef, str] | None:
        name, at, pin = model.partition("@")
        if at:
            version = _pinned(view.versions.get(name, {}), pin)
        elif (record := view.adapters.get(model)) is not None:
            return self.ref(record), model
        elif (alias := view.aliases.get(model)) is not None:
            target = alias.pick(user if user is not None else uuid.uuid4().hex)
            version = view.versions.get(target.adapter, {}).get(target.version)
        else:
            return None
        if version is None:
            return None
        # Its own adapter to the engine, never pinned there: any client may name a version.
        ref = AdapterRef(f"{version.name}@{version.version}", version.version, version.kind,
                         self.registry.store / version.folder, version.num_virtual_tokens, False, version.created_at)
        return ref, ref.name if at else model

    def _busy(self, name: str) -> list[int]:
        """`name`'s versions that requests here run on or resolved lately: not to be pruned."""
        recent = time.monotonic() - RESOLVED_HOLD_S
        self._resolved_at = {key: at for key, at in self._resolved_at.items() if at > recent}
        return [version for used, version in [*self._in_use, *self._resolved_at] if used == name]

    async def alias(self, name: str) -> AliasRecord | None:
        """Alias `name`, read afresh when the copy does not know it (made through another replica just now)."""
        if (alias := self.registry.cached_view().aliases.get(name)) is not None:
            return alias
        return (await self._read()).aliases.get(name)

    def view(self) -> RegistryView:
        return self.registry.cached_view()

    async def versions(self, name: str) -> list[VersionRecord] | None:
        """`name`'s kept versions, oldest first; None when it is not registered."""
        if await self.get(name) is None:
            return None
        return sorted(self.view().versions.get(name, {}).values(), key=lambda version: version.version)

    async def events(self, name: str, after: int, limit: int) -> list[AdapterEvent]:
        return await asyncio.to_thread(self.registry.events, name, after, limit)

    @contextmanager
    def using(self, ref: AdapterRef | None) -> Iterator[None]:
        """Hold `ref`'s version while a request runs on it: the registry prunes no version in use here."""
        if ref is None:
            yield
            return
        key = ref.adapter, ref.version
        self._in_use[key] += 1
        try:
            yield
        finally:
            self._in_use -= Counter({key: 1})

    async def _read(self) -> RegistryView:
        """The registry as of a read begun after this call. Reads run in a worker thread, one at a time, each
        shared by every call that came while the one before it ran: the event loop never waits on the
        database, and a burst of requests for unknown names costs one read. A read that takes over
        database.WAIT_S (a database whose packets are dropped) is not waited for: the copy answers."""
        if self._next_registry_read is None:
            self._next_registry_read = self._read_registry_after(self._reading_registry)
        read = self._next_registry_read
        try:
            return await asyncio.wait_for(asyncio.shield(read), database.WAIT_S)
        except TimeoutError:
            return self.registry.cached_view()

    def _read_registry_after(self, previous: asyncio.Future | None) -> asyncio.Future:
        async def read() -> RegistryView:
            if previous is not None:
                await asyncio.wait([previous])
            self._reading_registry, self._next_registry_read = started, None  # later calls wait for the next
            return await asyncio.to_thread(self.registry.snapshot)

        started = asyncio.ensure_future(read())
        started.add_done_callback(lambda done: done.cancelled() or done.exception())  # raised to its callers
        return started

    def ref(self, record: AdapterRecord) -> AdapterRef:
        return AdapterRef(record.name, record.version, record.kind, self.registry.path(record),
                          record.num_virtual_tokens, record.is_pinned, record.created_at)

    async def register(self, name: str, folder: Path, *, source: str, replace: bool, is_pinned: bool,
                       actor: str | None = None, provenance: dict | None = None) -> AdapterRecord:
        """Validate, stage, hand to the engine, then commit. All or nothing: an adapter the engine refuses
        leaves the registry as it was, and a replaced version's files go only once the new one serves.
        Requests already running finish on the old version."""
        await self._check_registration(name, replace=replace, is_pinned=is_pinned)
        adapter = await self.engine.read_adapter(folder)
        self.engine.check_adapter(adapter)
        current = await self.get(name)
        staged = await asyncio.to_thread(self.registry.stage, name, folder, replace=replace)
        # Served while it commits (under the version it may get): the engine is told the committed one after.
        expected = AdapterRef(name, current.version + 1 if current is not None and replace else 1, adapter.kind,
                              self.registry.store / staged, adapter.num_virtual_tokens, is_pinned, time.time())
        try:
            await self.engine.add_adapter(expected, adapter)
        except BaseException:
            await asyncio.to_thread(self.registry.discard, staged)
            raise
        busy = self._busy(name)
        try:
            record, pruned = await asyncio.to_thread(
                self.registry.commit, name, adapter.kind, adapter.num_virtual_tokens, staged, source=source,
                replace=replace, is_pinned=is_pinned, actor=actor, provenance=provenance, busy=busy)
        except BaseException:  # e.g. another replica took the name meanwhile: serve what the registry says
            await self.engine.remove_adapter(name)
            raise
        await self.engine.add_adapter(self.ref(record), adapter)  # the version and time the commit gave it
        await self._forget(pruned)
        return record

    async def compose(self, name: str, method: str, parts: list[tuple[str, str, float]], density: float | None, *,
                      replace: bool, is_pinned: bool, actor: str | None) -> AdapterRecord:
        """Register, as `name`, the LoRA PEFT's add_weighted_adapter composes from `parts` (the request field
        naming each, a name or pinned version, its weight) by `method`; its version records where it came from."""
        await self._check_registration(name, replace=replace, is_pinned=is_pinned)  # before the base loads
        view = await self._read()
        sources, provenance, refs = [], [], []
        for field, model, weight in parts:
            found = None if model in view.aliases else self._lookup(view, model, None)
            if found is None:
                raise AdapterGone(field, f"`{model}` is not a registered adapter (name or pinned version)")
            ref = found[0]
            if ref.kind != "lora":
                raise AdapterError(field, f"`{model}` is a {ref.kind} adapter; only LoRAs compose")
            sources.append(Source(field, ref.folder, weight))
            refs.append(ref)
            provenance.append({"adapter": ref.adapter, "version": ref.version, "weight": weight,
                               "sha256": view.versions[ref.adapter][ref.version].sha256})
        await asyncio.to_thread(check_sources, sources, method, density)
        async with self._composing:
            with ExitStack() as holding, tempfile.TemporaryDirectory(prefix="swapyard-compose-") as tmp:
                for ref in refs:  # not pruned while it is read
                    holding.enter_context(self.using(ref))
                folder = await asyncio.to_thread(compose_loras, self.base_path, sources, method, density, Path(tmp))
                return await self.register(name, folder, source=f"compose:{method}", replace=replace,
                                           is_pinned=is_pinned, actor=actor,
                                           provenance={"method": method, "density": density, "adapters": provenance})

    async def unregister(self, name: str, actor: str | None = None) -> AdapterRecord | None:
        record, versions = await asyncio.to_thread(self.registry.remove, name, actor)
        async with self._swap:
            if name == self.merged:
                await self._unmerge()
        await self.engine.remove_adapter(name)
        await self._forget(versions)
        if record is not None:
            forget_model(name)
        return record

    async def _check_registration(self, name: str, *, replace: bool, is_pinned: bool) -> None:
        """What refuses a registration before its files are read: the name (its form, the base's, taken) and
        the pin limit. The registry checks the name again when it commits."""
        self._not_the_base("name", name)
        await asyncio.to_thread(self.registry.check_name, name, replace)
        if is_pinned and len(pinned := {n for n, r in (await self._read()).adapters.items()
                                        if r.is_pinned and n != name}) >= self.max_pinned:
            raise AdapterLimit("pinned", f"{len(pinned)} adapters are pinned, this server's limit "
                                         f"(--max-pinned-adapters); register one of them again unpinned first")

    def _not_the_base(self, field: str, name: str) -> None:
        if name.casefold() == self.base_model.casefold():
            raise AdapterError(field, f"`{name}` is the base model's name (names are compared ignoring case)")

    async def _forget(self, versions: list[VersionRecord]) -> None:
        """Versions that left the registry leave the engine (once their requests end) and /metrics."""
        for version in versions:
            label = f"{version.name}@{version.version}"
            await self.engine.remove_adapter(label)
            forget_version(label)
            forget_model(label)  # the engine's series of it, and requests that named it

    async def set_alias(self, alias: str, targets: list[tuple[str, str, float]], actor: str | None = None
                        ) -> AliasRecord:
        """Point `alias` at the versions `targets` name, as (the request field naming it, model, weight): `name`
        means its newest version now (a later registration does not move the alias), `name@N` or
        `name@sha256:HEX` a pinned one."""
        view = await self._read()
        self._not_the_base("alias", alias)
        pinned = []
        for field, model, weight in targets:
            name, at, pin = model.partition("@")
            if not at and model in view.aliases:
                raise AdapterError(field, f"`{model}` is an alias; an alias points at versions")
            record = view.adapters.get(name)
            version = _pinned(view.versions.get(name, {}), pin) if at else \
                view.versions.get(name, {}).get(record.version) if record is not None else None
            if version is None:
                raise AdapterGone(field, f"`{model}` is not a registered adapter version")
            pinned.append(AliasTarget(adapter=version.name, version=version.version, weight=weight))
        return await asyncio.to_thread(self.registry.set_alias, alias, pinned, actor)

    async def delete_alias(self, alias: str, actor: str | None = None) -> AliasRecord | None:
        record = await asyncio.to_thread(self.registry.delete_alias, alias, actor)
        if record is not None:
            forget_model(alias)
        return record

    async def merge(self, name: str) -> AdapterRecord:
        """Fold LoRA `name` into the base weights (unmerging the one merged before)."""
        record = await self.get(name)
        if record is None:
            raise AdapterGone("model", f"adapter `{name}` is not registered")
        if record.kind != "lora":
            raise AdapterError("name", f"only LoRA adapters fold into the weights; `{name}` is {record.kind}")
        async with self._swap:
            if self.merged not in (None, name):
                await self._unmerge()
            await self.engine.merge_adapter(self.ref(record))
            MERGED_ADAPTER.labels(name).set(1)
        return record

    async def unmerge(self, name: str) -> bool:
        """Restore the base weights if `name` is the merged LoRA; False when it is not."""
        async with self._swap:
            if self.merged != name:
                return False
            await self._unmerge()
            return True

    async def _unmerge(self) -> None:
        if (merged := self.merged) is not None:
            await self.engine.unmerge_adapter()
            MERGED_ADAPTER.labels(merged).set(0)


def _pinned(versions: dict[int, VersionRecord], pin: str) -> VersionRecord | None:
    """The version `pin` (after the '@') names among `versions`: a number, or sha256:HEX (the newest with it)."""
    if pin.isdigit() and pin.isascii():
        return versions.get(int(pin)) if len(pin) <= MAX_VERSION_DIGITS else None
    digits = pin.removeprefix(SHA256_PIN).lower()
    if not pin.startswith(SHA256_PIN) or len(digits) < MIN_SHA256_PREFIX:
        return None
    matching = [v for v in versions.values() if v.sha256 is not None and v.sha256.startswith(digits)]
    return max(matching, key=lambda version: version.version, default=None)
