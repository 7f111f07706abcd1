"""Keeps the registry (disk) and the engine's resident adapters in step.

At most `max_resident` adapters sit on the engine's device; a request for another one loads it from
the store, evicting the least recently used adapter that is neither pinned, merged nor serving a request.
When every slot serves requests, the request waits here (queued, not refused) until one frees, in line by
adapter, first come first served: only the first adapter's requests try for the next slot. After
FAIR_WAIT_S of waiting, new requests for the least recently used adapter wait too, so that its slot drains
even under a steady stream for it. A request for a resident adapter takes no lock; routing it read the
registry's version row once, in a worker thread shared with the requests that came meanwhile (`records`).
At most PREFETCH_DEPTH cold requests at a time (those arriving while fewer hold one) read and check their
adapter's files before they queue for the lock, so reading overlaps with the loads ahead of them; the others
read when their turn comes. Files are read one adapter at a time: on a CPU host, a parse beside the engine's
threads slows every step (measured on 2 cores: back-to-back parses made decode steps 3.5x slower), so reading
ahead of need costs more than it hides.
Evicted adapters stay parsed in host memory (the host tier, `max_cached` of them), so a reload skips the disk;
it is pinned memory when the engine copies to a GPU.
At most one LoRA is merged into the base weights; replacing or deleting it unmerges it first.
"""

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch

from adapters.base import (AdapterCapacityError, AdapterError, AdapterGone, AdapterLoadError, BaseModelSpec,
                           map_tensors)
from adapters.loading import Adapter, load_adapter
from adapters.registry import AdapterRecord, AdapterRegistry
from server import database
from server.engine.base import Engine
from server.metrics import (
    ADAPTER_EVICTIONS, ADAPTER_HOST_CACHE, ADAPTER_LOAD_TIME, ADAPTER_LOADS, ADAPTER_QUEUE, ADAPTER_WAIT_TIME,
    MERGED_ADAPTER, RESIDENT_ADAPTERS, forget_model,
)

FAIR_WAIT_S = 2.0
PREFETCH_DEPTH = 2  # cold requests that hold their adapter read ahead of its load


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, engine: Engine, base: BaseModelSpec, base_model: str, *,
                 max_resident: int, max_lora_rank: int, max_cached: int = 0):
        self.registry, self.engine, self.base, self.base_model = registry, engine, base, base_model
        self.max_resident, self.max_lora_rank, self.max_cached = max_resident, max_lora_rank, max_cached
        # The host tier: parsed, checked adapters by (name, version); a new version is a new key, so a
        # replaced adapter can never be served from here.
        self._host: OrderedDict[tuple[str, int], Adapter] = OrderedDict()
        self._loaded: dict[str, Adapter] = {}  # what each resident adapter was loaded from
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> version, least recently used first
        self._in_use: Counter[str] = Counter()
        self._reading: dict[tuple[str, int], asyncio.Future[Adapter]] = {}  # store reads in flight
        self._reader = asyncio.Lock()  # one adapter's files read at a time
        self._num_prefetched = 0  # cold requests holding a read-ahead adapter
        # The adapters cold requests wait for, first come first: how many wait, and the event that wakes them
        # (set and replaced).
        self._line: OrderedDict[str, tuple[int, asyncio.Event]] = OrderedDict()
        self._lock = asyncio.Lock()  # one load, eviction or merge at a time
        self._draining: str | None = None  # an adapter whose new requests wait, so its slot frees
        self._reading_registry: asyncio.Future | None = None  # the registry read under way
        self._next_registry_read: asyncio.Future | None = None  # the one after it, shared by calls meanwhile

    @property
    def merged(self) -> str | None:
        """The LoRA folded into the base weights, as the engine (its one owner) says."""
        return self.engine.merged

    async def records(self) -> dict[str, AdapterRecord]:
        """The registry as of a read begun after this call, so whatever any replica committed before it is
        seen. Reads run in a worker thread, one at a time, each shared by every call that came while the one
        before it ran: the event loop never waits on the database, and a burst of requests costs one read. A
        read that takes over database.WAIT_S (a database whose packets are dropped) is not waited for: the
        last read serves meanwhile."""
        if self._next_registry_read is None:
            self._next_registry_read = self._read_registry_after(self._reading_registry)
        read = self._next_registry_read
        try:
            return await asyncio.wait_for(asyncio.shield(read), database.WAIT_S)
        except TimeoutError:
            cached = self.registry.cached()
            return cached if cached is not None else await asyncio.shield(read)

    def _read_registry_after(self, previous: asyncio.Future | None) -> asyncio.Future:
        async def read() -> dict[str, AdapterRecord]:
            if previous is not None:
                await asyncio.wait([previous])
            self._reading_registry, self._next_registry_read = started, None  # later calls wait for the next
            return await asyncio.to_thread(self.registry.snapshot)

        started = asyncio.ensure_future(read())
        started.add_done_callback(lambda done: done.cancelled() or done.exception())  # raised to its callers
        return started

    async def get(self, name: str) -> AdapterRecord | None:
        return (await self.records()).get(name)

    async def register(self, name: str, folder: Path, *, source: str, replace: bool, is_pinned: bool) -> AdapterRecord:
        """Validate, stage, load into the engine, then commit. All or nothing: an adapter the engine refuses
        leaves the registry as it was, and a replaced version's files go only once the new one serves.
        Requests already running finish on the old version."""
        if name.casefold() == self.base_model.casefold():
            raise AdapterError("name", f"`{name}` is the base model's name (names are compared ignoring case)")
        start = time.monotonic()
        adapter = await self._read(folder)
        self.engine.check_adapter(adapter)
        staged = await asyncio.to_thread(self.registry.stage, name, folder, replace=replace)
        async with self._lock:
            is_loaded = True
            try:
                await self._load(name, adapter, self.registry.store / staged, None, start)
            except AdapterCapacityError:  # every slot is pinned or busy: registered all the same, loaded on use
                is_loaded = False
            except BaseException:
                await asyncio.to_thread(self.registry.discard, staged)
                raise
            try:
                record = await asyncio.to_thread(self.registry.commit, name, adapter.kind,
                                                 adapter.num_virtual_tokens, staged, source=source,
                                                 replace=replace, is_pinned=is_pinned)
            except BaseException:  # e.g. another replica took the name meanwhile: serve what the registry says
                await self._drop_resident(name)
                raise
            if is_loaded:  # else a previous version may still be resident, and is replaced on first use
                self._resident[name] = record.version
        return record

    async def unregister(self, name: str) -> AdapterRecord | None:
        record = await asyncio.to_thread(self.registry.remove, name)
        async with self._lock:
            if name == self.merged:
                await self._unmerge()
            await self._drop_resident(name)
        if record is not None:
            forget_model(name)
        return record

    async def _drop_resident(self, name: str) -> None:
        """`name` leaves the device and the host tier (it is replaced or deleted)."""
        self._loaded.pop(name, None)
        self._forget_host(name)
        if name in self._resident:
            del self._resident[name]
            RESIDENT_ADAPTERS.set(len(self._resident))
            await self.engine.unload_adapter(name)
            self._signal()

    @asynccontextmanager
    async def use(self, name: str, version: int) -> AsyncIterator[None]:
        """Hold `name` resident for the duration of one request, loading it (or waiting for a slot) first;
        `version` is the one the request was routed to (a newer one registered since is loaded instead)."""
        if self._resident.get(name) == version and name != self._draining:  # warm: no lock, no await, no database
            self._in_use[name] += 1
        else:
            await self._claim_cold(name)
        try:
            yield
        finally:
            self._in_use[name] -= 1
            if self._in_use[name] == 0:
                self._signal()

    def _signal(self) -> None:
        """A slot may have freed, or the line moved: wake the requests that may go now, those of the first adapter
        in line and of resident ones (without the lock: a finishing request never waits)."""
        woken = [name for position, name in enumerate(self._line) if position == 0 or name in self._resident]
        for name in woken:
            count, event = self._line[name]
            event.set()
            self._line[name] = (count, asyncio.Event())

    async def _claim_cold(self, name: str) -> None:
        start, drains, prefetched = time.monotonic(), None, None
        record = await self._record(name)
        is_reading_ahead = self._resident.get(name) != record.version and self._num_prefetched < PREFETCH_DEPTH
        self._num_prefetched += is_reading_ahead
        count, event = self._line.get(name, (0, asyncio.Event()))
        self._line[name] = (count + 1, event)
        ADAPTER_QUEUE.inc()
        try:
            if is_reading_ahead:  # read while the loads ahead run, so the lock is held only for the device work
                prefetched = await self._parse(record)
            while True:
                _, turn = self._line[name]  # taken before trying: a slot freed meanwhile sets it
                # Only the first adapter in line tries for a slot (or one made resident meanwhile): with hundreds
                # waiting, every request retrying at each freed slot kept the event loop busy, and the engine
                # thread waiting for the GIL, longer than the steps themselves.
                if name in self._resident or next(iter(self._line)) == name:
                    async with self._lock:
                        try:
                            await self._ensure_resident(name, prefetched)
                        except AdapterCapacityError:
                            if not self._can_free_a_slot():
                                raise
                            order = self._eviction_order()
                            if time.monotonic() - start > FAIR_WAIT_S and self._draining is None and order:
                                self._draining = drains = order[0]
                        else:
                            if name != self._draining:
                                self._in_use[name] += 1
                                break
                try:  # woken when this adapter's turn may have come; also on a timer, to start draining one
                    await asyncio.wait_for(turn.wait(), FAIR_WAIT_S)
                except TimeoutError:
                    pass
        finally:
            ADAPTER_QUEUE.dec()
            self._num_prefetched -= is_reading_ahead
            count, event = self._line[name]
            if count > 1:  # still waited for: keeps its place in line
                self._line[name] = (count - 1, event)
            else:
                del self._line[name]
            self._signal()  # the line moved: the next adapter's requests (or this one's) try
            if drains is not None and self._draining == drains:  # served or gone: the drained adapter serves again
                self._draining = None
                self._signal()
        ADAPTER_WAIT_TIME.labels(name).observe(time.monotonic() - start)

    def _forget_host(self, name: str) -> None:
        for key in [key for key in self._host if key[0] == name]:
            del self._host[key]

    def _keep_on_host(self, key: tuple[str, int], adapter: Adapter) -> None:
        if self.max_cached:
            self._host[key] = adapter
            self._host.move_to_end(key)
            while len(self._host) > self.max_cached:
                self._host.popitem(last=False)

    def _eviction_order(self) -> list[str]:
        """Resident adapters that may leave once idle, least recently used first (pins as last read)."""
        records = self.registry.cached() or {}
        return [name for name in self._resident
                if name != self.merged and not (name in records and records[name].is_pinned)]

    def _can_free_a_slot(self) -> bool:
        return len(self._resident) < self.max_resident or bool(self._eviction_order())

    async def merge(self, name: str) -> AdapterRecord:
        """Fold LoRA `name` into the base weights (unmerging the one merged before)."""
        record = await self._record(name)
        if record.kind != "lora":
            raise AdapterError("name", f"only LoRA adapters fold into the weights; `{name}` is {record.kind}")
        async with self._lock:
            await self._ensure_resident(name)
            if self.merged not in (None, name):
                await self._unmerge()
            await self.engine.merge_adapter(name)
            MERGED_ADAPTER.labels(name).set(1)
        return record

    async def unmerge(self, name: str) -> bool:
        """Restore the base weights if `name` is the merged LoRA; False when it is not."""
        async with self._lock:
            if self.merged != name:
                return False
            await self._unmerge()
            return True

    async def _unmerge(self) -> None:
        if (merged := self.merged) is not None:
            await self.engine.unmerge_adapter()
            MERGED_ADAPTER.labels(merged).set(0)

    async def _record(self, name: str) -> AdapterRecord:
        record = await self.get(name)
        if record is None:
            raise AdapterGone("model", f"adapter `{name}` is not registered")
        return record

    async def _parse(self, record: AdapterRecord) -> tuple[tuple[str, int], Adapter, str]:
        """(key, adapter, "hit" or "miss"): the version `record` names, from the host tier or read from the
        store; requests that need the same version at once share one read."""
        key = (record.name, record.version)
        if (adapter := self._host.get(key)) is not None:
            return key, adapter, "hit"
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read(self.registry.path(record)))
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        try:
            return key, await asyncio.shield(reading), "miss"
        except AdapterError as exc:
            raise AdapterLoadError("model", f"adapter `{record.name}` (version {record.version}) failed to load "
                                            f"from the store: {exc}") from exc

    async def _read(self, folder: Path) -> Adapter:
        async with self._reader:
            return await asyncio.to_thread(self._parse_files, folder)

    def _parse_files(self, folder: Path) -> Adapter:
        adapter = load_adapter(folder, self.base, max_lora_rank=self.max_lora_rank)
        # Pinned, a host-tier adapter's copy to a GPU runs without a bounce buffer and does not wait.
        return map_tensors(adapter, torch.Tensor.pin_memory) if self.engine.pins_host_memory else adapter

    async def _ensure_resident(self, name: str, prefetched: tuple[tuple[str, int], Adapter, str] | None = None
                               ) -> None:
        """Load `name` unless its registered version is resident (another replica may have replaced it);
        `prefetched` is a parse made before the lock, used if it is still the registered version."""
        record = await self._record(name)
        if self._resident.get(name) != record.version:
            start = time.monotonic()
            if prefetched is None or prefetched[0] != (name, record.version):
                prefetched = await self._parse(record)
            key, adapter, result = prefetched
            try:
                await self._load(name, adapter, self.registry.path(record), record.version, start)
            except AdapterCapacityError:  # no slot yet: keep the parsed adapter for the retry
                self._keep_on_host(key, adapter)
                raise
            ADAPTER_HOST_CACHE.labels(result).inc()
        self._resident.move_to_end(name)

    async def _load(self, name: str, adapter: Adapter, folder: Path, version: int | None, start: float) -> None:
        """Put `adapter` on the engine as `name` (version None: staged, set once committed)."""
        if name == self.merged:  # a new version: the old one leaves the weights first
            await self._unmerge()
        if name not in self._resident:
            while len(self._resident) >= self.max_resident:
                await self._evict_one()
        await self.engine.load_adapter(name, adapter, folder)
        self._forget_host(name)  # an older version's entry would only take memory
        self._loaded[name] = adapter
        self._resident[name] = version
        self._resident.move_to_end(name)
        RESIDENT_ADAPTERS.set(len(self._resident))
        ADAPTER_LOADS.labels(name).inc()
        ADAPTER_LOAD_TIME.labels(name).observe(time.monotonic() - start)

    async def _evict_one(self) -> None:
        for name in self._eviction_order():
            if self._in_use[name] == 0:
                version, adapter = self._resident.pop(name), self._loaded.pop(name, None)
                await self.engine.unload_adapter(name)
                if version is not None and adapter is not None:
                    self._keep_on_host((name, version), adapter)
                ADAPTER_EVICTIONS.labels(name).inc()
                return
        raise AdapterCapacityError("capacity", f"all {self.max_resident} resident adapters are pinned or busy; "
                                               f"retry shortly")
