"""Adapter names to registered versions, and registration. The engine owns residency.

A request's adapter is resolved here to an AdapterRef (name, version, files) from the registry's copy, which
its watcher thread keeps current (within a second of another replica's change): a warm request touches no
lock and no database. Which versions are on the device, which wait for a slot and when a replaced version's
memory frees is the engine's alone (server/engine/residency.py); this module only tells it what was
registered, deleted, merged or unmerged.
"""

import asyncio
import time
from pathlib import Path

from adapters.base import AdapterError, AdapterGone
from adapters.registry import AdapterRecord, AdapterRegistry
from server import database
from server.engine.base import Engine
from server.engine.residency import AdapterRef
from server.metrics import MERGED_ADAPTER, forget_model


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, engine: Engine, base_model: str):
        self.registry, self.engine, self.base_model = registry, engine, base_model
        self._reading_registry: asyncio.Future | None = None  # the registry read under way
        self._next_registry_read: asyncio.Future | None = None  # the one after it, shared by calls meanwhile
        self._swap = asyncio.Lock()  # one merge or unmerge at a time (loads never wait for it)
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
        return (await self._read()).get(name)

    async def _read(self) -> dict[str, AdapterRecord]:
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
            return self.registry.cached()

    def _read_registry_after(self, previous: asyncio.Future | None) -> asyncio.Future:
        async def read() -> dict[str, AdapterRecord]:
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

    async def register(self, name: str, folder: Path, *, source: str, replace: bool, is_pinned: bool) -> AdapterRecord:
        """Validate, stage, hand to the engine, then commit. All or nothing: an adapter the engine refuses
        leaves the registry as it was, and a replaced version's files go only once the new one serves.
        Requests already running finish on the old version."""
        if name.casefold() == self.base_model.casefold():
            raise AdapterError("name", f"`{name}` is the base model's name (names are compared ignoring case)")
        adapter = await self.engine.read_adapter(folder)
        self.engine.check_adapter(adapter)
        current = await self.get(name)
        staged = await asyncio.to_thread(self.registry.stage, name, folder, replace=replace)
        # The version the commit is expected to give; if another replica commits first, the engine is told
        # the one it gave.
        expected = AdapterRef(name, current.version + 1 if current is not None and replace else 1, adapter.kind,
                              self.registry.store / staged, adapter.num_virtual_tokens, is_pinned, time.time())
        try:
            await self.engine.add_adapter(expected, adapter)
        except BaseException:
            await asyncio.to_thread(self.registry.discard, staged)
            raise
        try:
            record = await asyncio.to_thread(self.registry.commit, name, adapter.kind, adapter.num_virtual_tokens,
                                             staged, source=source, replace=replace, is_pinned=is_pinned)
        except BaseException:  # e.g. another replica took the name meanwhile: serve what the registry says
            await self.engine.remove_adapter(name)
            raise
        if (committed := self.ref(record)) != expected:
            await self.engine.add_adapter(committed, adapter)
        return record

    async def unregister(self, name: str) -> AdapterRecord | None:
        record = await asyncio.to_thread(self.registry.remove, name)
        async with self._swap:
            if name == self.merged:
                await self._unmerge()
        await self.engine.remove_adapter(name)
        if record is not None:
            forget_model(name)
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
