"""What an engine needs to own adapter residency: the reference a request carries, the host tier that
reads adapters from their files, and the slot table that decides which versions stay resident.

The front end only resolves a name to an `AdapterRef`; the engine alone decides what is resident (as
vLLM's and LoRAX's front ends leave it to their schedulers). Each engine keeps one `SlotTable` where its
residency changes (the torch engine's thread, the vLLM engine's event loop) and counts running requests
itself, so no fact about an adapter has two owners.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

from adapters.base import AdapterCapacityError, AdapterError, AdapterGone, AdapterLoadError, BaseModelSpec, map_tensors
from adapters.loading import Adapter, load_adapter
from server.metrics import (ADAPTER_EVICTIONS, ADAPTER_HOST_CACHE, ADAPTER_LOAD_TIME, ADAPTER_LOADS,
                            RESIDENT_ADAPTERS)

# A request that has waited this long for a slot makes the least recently used busy adapter drain: its new
# requests wait too, so that its slot frees even under a steady stream for it.
FAIR_WAIT_S = 2.0


@dataclass(frozen=True)
class AdapterRef:
    """One registered version of an adapter, as the router resolved it: all an engine needs to load it."""

    name: str
    version: int
    kind: str
    folder: Path  # its files in the store (one folder per content: versions with the same files share it)
    num_virtual_tokens: int = 0  # prefix/prompt positions it adds before the prompt
    is_pinned: bool = False  # never evicted
    # When the registry committed it: orders a name's versions (a newer resident one serves a request routed to
    # an older one).
    registered_at: float = 0.0

    @property
    def adapter(self) -> str:
        """The registered name: a version pinned by number, sha256 or alias is served as `name@N`, an adapter
        of its own to the engine, so that a newer version never answers for it ('@' is in no name)."""
        return self.name.partition("@")[0]

    @property
    def label(self) -> str:
        """The version as metrics name it: `name@N`."""
        return f"{self.adapter}@{self.version}"

    @property
    def key(self) -> tuple[str, int, Path]:
        """Names this version of this name (the folder too: in a registry from before versions were kept, a name
        deleted and registered again began at 1 again)."""
        return self.name, self.version, self.folder


class AdapterReader:
    """Parsed, checked adapters in host memory (the host tier, `max_cached` of them, least recently used
    first), read from their files one adapter at a time: on a CPU host, a parse beside the engine's threads
    slows every step (2 cores: back-to-back parses made decode steps 3.5x slower). A reload from here skips
    the disk; the memory is pinned when the engine copies to a GPU. Event loop only."""

    def __init__(self, base: BaseModelSpec, max_lora_rank: int, max_cached: int, *, pin: bool):
        self.base, self.max_lora_rank, self.max_cached, self.pin = base, max_lora_rank, max_cached, pin
        self._host: OrderedDict[tuple, Adapter] = OrderedDict()
        self._reading: dict[tuple, asyncio.Future[Adapter]] = {}  # store reads in flight, shared
        self._one_at_a_time = asyncio.Lock()

    async def read(self, ref: AdapterRef) -> Adapter:
        """The version `ref` names, from the host tier or its files; requests that need it at once share one
        read. A folder that is gone means the version was replaced or deleted meanwhile: 404."""
        if (adapter := self._host.get(ref.key)) is not None:
            self._host.move_to_end(ref.key)
            ADAPTER_HOST_CACHE.labels("hit").inc()
            return adapter
        reading = self._reading.get(ref.key)
        if reading is None:
            reading = self._reading[ref.key] = asyncio.ensure_future(self.read_folder(ref.folder))
            reading.add_done_callback(lambda _: self._reading.pop(ref.key, None))
        try:
            adapter = await asyncio.shield(reading)
        except AdapterError as exc:
            if not ref.folder.exists():
                raise AdapterGone("model", f"adapter `{ref.name}` (version {ref.version}) was replaced or "
                                           f"deleted") from exc
            raise AdapterLoadError("model", f"adapter `{ref.name}` (version {ref.version}) failed to load from "
                                            f"the store: {exc}") from exc
        ADAPTER_HOST_CACHE.labels("miss").inc()
        return adapter

    async def read_folder(self, folder: Path) -> Adapter:
        async with self._one_at_a_time:
            return await asyncio.to_thread(self._parse, folder)

    def _parse(self, folder: Path) -> Adapter:
        adapter = load_adapter(folder, self.base, max_lora_rank=self.max_lora_rank)
        # Pinned, a host-tier adapter's copy to a GPU runs without a bounce buffer and does not wait.
        return map_tensors(adapter, torch.Tensor.pin_memory) if self.pin else adapter

    def keep(self, ref: AdapterRef, adapter: Adapter) -> None:
        """Hold `adapter` (it left the device, or waits for a slot) for a reload without the disk."""
        if self.max_cached:
            self._host[ref.key] = adapter
            self._host.move_to_end(ref.key)
            while len(self._host) > self.max_cached:
                self._host.popitem(last=False)
            RESIDENT_ADAPTERS.labels("host").set(len(self._host))

    def forget(self, name: str) -> None:
        """Every version of `name` (replaced or deleted) leaves the host tier."""
        for key in [key for key in self._host if key[0] == name]:
            del self._host[key]
        RESIDENT_ADAPTERS.labels("host").set(len(self._host))

    def holds(self, ref: AdapterRef) -> bool:
        """Whether `ref`'s version is in the host tier."""
        return ref.key in self._host


Handle = TypeVar("Handle")  # what an engine holds for one resident version (the torch bank's Resident, ...)


@dataclass
class _Slot(Generic[Handle]):
    ref: AdapterRef
    handle: Handle
    adapter: Adapter  # as read (host memory), kept on the host tier when it leaves the device


class SlotTable(Generic[Handle]):
    """Which version of each adapter holds one of the engine's `capacity` slots, least recently used first,
    and which may leave for a waiting one: idle (`is_idle`, the engine's own count of running requests),
    not pinned, not merged. Single-threaded: the caller's thread or loop owns it."""

    def __init__(self, capacity: int, is_idle: Callable[[Handle], bool], merged: Callable[[], str | None]):
        self.capacity, self._is_idle, self._merged = capacity, is_idle, merged
        self._slots: OrderedDict[str, _Slot[Handle]] = OrderedDict()
        self.draining: str | None = None  # a busy adapter whose new requests wait, so that its slot frees
        self._waiting_since: float | None = None  # the oldest wait for a slot under way

    def get(self, name: str) -> _Slot[Handle] | None:
        return self._slots.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def __iter__(self):
        return iter(self._slots.values())

    def serves(self, ref: AdapterRef) -> Handle | None:
        """The resident handle a request routed to `ref` runs with (a newer version registered since serves
        it too), else None: it must be loaded."""
        slot = self.slot_serving(ref)
        if slot is None:
            return None
        self._slots.move_to_end(ref.name)
        return slot.handle

    def slot_serving(self, ref: AdapterRef) -> _Slot[Handle] | None:
        """The slot whose version answers `ref` (its own, or one registered after it), leaving the LRU order."""
        slot = self._slots.get(ref.name)
        if slot is None or (slot.ref.key != ref.key and slot.ref.registered_at <= ref.registered_at):
            return None  # none, or an older version is resident
        return slot

    def renamed(self, ref: AdapterRef) -> bool:
        """Whether `ref`'s files are resident already (placed while staged, under the version the registry
        was expected to give): its slot takes the version the registry committed."""
        slot = self._slots.get(ref.name)
        if slot is None or slot.ref.folder != ref.folder:
            return False
        slot.ref = ref
        return True

    def room_for(self, ref: AdapterRef) -> bool:
        """Make room for `ref`: True when it may be placed now (a slot was free, the LRU idle one was
        evicted, or it replaces its own older version); False when it must wait for a slot. Raises
        AdapterCapacityError when no slot can ever free (every one pinned or merged)."""
        if ref.name in self._slots or len(self._slots) < self.capacity:
            return True
        movable = self._movable()
        if not movable:
            raise AdapterCapacityError("capacity", f"all {self.capacity} resident adapters are pinned or merged")
        idle = next((slot for slot in movable if self._is_idle(slot.handle)), None)
        if idle is not None:
            return True
        now = time.monotonic()
        self._waiting_since = self._waiting_since or now
        if now - self._waiting_since > FAIR_WAIT_S and self.draining is None:
            self.draining = movable[0].ref.name
        return False

    def evict_one(self) -> _Slot[Handle] | None:
        """Take the least recently used idle, movable slot out of the table (None when at most full)."""
        if len(self._slots) < self.capacity:
            return None
        for slot in self._movable():
            if self._is_idle(slot.handle):
                del self._slots[slot.ref.name]
                ADAPTER_EVICTIONS.labels(slot.ref.name).inc()
                RESIDENT_ADAPTERS.labels("device").set(len(self._slots))
                return slot
        raise AdapterCapacityError("capacity", f"all {self.capacity} resident adapters are pinned or busy")

    def _movable(self) -> list[_Slot[Handle]]:
        """Slots that may leave once idle (neither pinned nor merged), least recently used first."""
        merged = self._merged()
        return [slot for name, slot in self._slots.items() if not slot.ref.is_pinned and name != merged]

    def placed(self, ref: AdapterRef, handle: Handle, adapter: Adapter, started: float) -> _Slot[Handle] | None:
        """Record `ref` as resident; returns the slot of the version it replaces, if any. A placement ends any
        wait that made an adapter drain."""
        replaced = self._slots.pop(ref.name, None)
        self._slots[ref.name] = _Slot(ref, handle, adapter)
        self.draining = self._waiting_since = None
        RESIDENT_ADAPTERS.labels("device").set(len(self._slots))
        ADAPTER_LOADS.labels(ref.name).inc()
        ADAPTER_LOAD_TIME.labels(ref.name).observe(time.monotonic() - started)
        return replaced

    def waiting_for(self, names: set[str]) -> None:
        """The adapters requests wait for now: when none but the drained one (whose own requests wait while it
        drains), nobody waits for a slot any more and it serves again."""
        if not names - {self.draining}:
            self.draining = self._waiting_since = None

    def remove(self, name: str) -> _Slot[Handle] | None:
        slot = self._slots.pop(name, None)
        if self.draining == name:
            self.draining = None
        RESIDENT_ADAPTERS.labels("device").set(len(self._slots))
        return slot


def tier(slots: SlotTable, reader: AdapterReader, ref: AdapterRef) -> str:
    """Where `ref`'s version is: on the device, in the host tier, or only in the store on disk. A read from
    outside the engine's thread: a report, not a decision."""
    if slots.slot_serving(ref) is not None:
        return "device"
    return "host" if reader.holds(ref) else "disk"
