"""The torch engine's one owner of adapter residency, on the engine thread: which version of each adapter
holds a slot (a SlotTable), what the scheduler admits a sequence with, and the reads it asks for.

A sequence whose adapter is not resident waits in the scheduler's queue, skipped (as vLLM skips a request
whose LoRA would exceed max_loras), while the event loop reads the adapter's files; it is placed once read,
in a free slot or the least recently used idle one's. The bank counts each version's running sequences,
and frees a replaced version when the last of them ends.
"""

import time
from collections.abc import Callable

from adapters.base import AdapterCapacityError, AdapterError
from adapters.loading import Adapter
from server.engine.torch.adapter_bank import AdapterBank, Resident
from server.engine.residency import AdapterRef, SlotTable

# Reads asked for ahead of a slot: the first cold versions in line are read while the loads ahead of them
# run; the others are read when their turn comes (reading far ahead costs steps on a CPU, see AdapterReader).
READ_AHEAD = 2


class TorchResidency:
    def __init__(self, bank: AdapterBank, capacity: int, read: Callable[[AdapterRef], None],
                 keep: Callable[[AdapterRef, Adapter], None]):
        """`read(ref)` asks the event loop for ref's adapter (answered through `offer`); `keep` hands one that
        left the device, or that nobody waits for any more, to the host tier."""
        self.bank, self._read, self._keep = bank, read, keep
        self.slots: SlotTable[Resident] = SlotTable(capacity, is_idle=lambda resident: resident.num_active == 0,
                                                    merged=lambda: self.merged)
        # Reads asked for, by key, and when (a load's time counts its read).
        self._asked: dict[tuple, tuple[AdapterRef, float]] = {}
        self._read_done: dict[tuple, Adapter | AdapterError] = {}  # reads answered, waiting for a slot

    @property
    def merged(self) -> str | None:
        return self.bank.merged.name if self.bank.merged is not None else None

    def claim(self, ref: AdapterRef) -> Resident | None:
        """The version a sequence routed to `ref` runs with, held for it; None while it must wait (its read is
        under way, no slot is free, or its adapter drains). Raises AdapterError when it cannot be served (its
        read failed, every slot is pinned or merged)."""
        if ref.name == self.slots.draining:
            return None
        resident = self.slots.serves(ref)
        if resident is None:
            resident = self._place(ref)
        if resident is not None:
            self.bank.acquire(resident)
        return resident

    def settle(self, waiting: set[tuple]) -> None:
        """After an admission pass: `waiting`, the keys of the versions queued sequences wait for. Reads nobody
        waits for any more (their requests left) give their place to others; a finished one goes to the host
        tier."""
        for key in [key for key in self._asked if key not in waiting]:
            done = self._read_done.get(key)
            if done is not None and not isinstance(done, AdapterError):
                self._keep(self._asked[key][0], done)
            self._forget_read(key)
        self.slots.waiting_for({key[0] for key in waiting})

    def offer(self, ref: AdapterRef, adapter: Adapter | AdapterError) -> None:
        """A read asked for is done (or failed): the sequences waiting for it try at the next admission. One
        nobody waits for any more goes to the host tier."""
        if ref.key in self._asked:
            self._read_done[ref.key] = adapter
        elif not isinstance(adapter, AdapterError):
            self._keep(ref, adapter)

    def add(self, ref: AdapterRef, adapter: Adapter) -> None:
        """A version being registered: placed now where a slot is free or idle (replacing its own older
        version at once), else kept on the host tier for its first request. Raises AdapterError where the
        device refuses it (before the registry commits it)."""
        if self.slots.renamed(ref):  # placed while staged, now committed
            return
        try:
            placed = self._place_read(ref, adapter)
        except AdapterCapacityError:
            placed = None
        if placed is None:
            self._keep(ref, adapter)

    def remove(self, name: str) -> None:
        """`name` was deleted: its resident version leaves once its running sequences end."""
        slot = self.slots.remove(name)
        if slot is not None:
            if self.bank.merged is slot.handle:
                self.bank.unmerge()
            self.bank.retire(slot.handle)
        for key in [key for key in self._asked if key[0] == name]:
            self._forget_read(key)

    def merge(self, ref: AdapterRef, adapter: Adapter) -> None:
        """Fold `ref` into the base weights, placing it first if it is not resident."""
        resident = self.slots.serves(ref)
        if resident is None:
            resident = self._place_read(ref, adapter)
            if resident is None:
                raise AdapterCapacityError("capacity", f"every adapter slot is busy; `{ref.name}` can be merged "
                                                       f"once one frees, retry shortly")
        self.bank.merge(resident)

    def _place_read(self, ref: AdapterRef, adapter: Adapter) -> Resident | None:
        """Place `ref` from an adapter read elsewhere (a registration, a merge); None when no slot frees now."""
        self._asked[ref.key], self._read_done[ref.key] = (ref, time.monotonic()), adapter
        try:
            return self._place(ref)
        finally:
            self._forget_read(ref.key)

    def _place(self, ref: AdapterRef) -> Resident | None:
        done = self._read_done.get(ref.key)
        if done is None:
            if ref.key not in self._asked and len(self._asked) < READ_AHEAD:
                self._asked[ref.key] = ref, time.monotonic()
                self._read(ref)
            return None
        if isinstance(done, AdapterError):  # this sequence is refused; the next one reads again
            self._forget_read(ref.key)
            raise done
        if not self.slots.room_for(ref):
            return None
        if self.slots.get(ref.name) is None and (evicted := self.slots.evict_one()) is not None:
            self.bank.retire(evicted.handle)
            self._keep(evicted.ref, evicted.adapter)
        replaced = self.slots.get(ref.name)
        if replaced is not None and self.bank.merged is replaced.handle:  # the old version leaves the weights first
            self.bank.unmerge()
        try:
            resident = self.bank.place(ref.name, done)
        except AdapterCapacityError:  # replaced versions still running hold the bank's spare places: wait
            return None
        except BaseException:  # e.g. out of memory: this sequence fails; the next one reads again
            self._forget_read(ref.key)
            raise
        self.slots.placed(ref, resident, done, self._asked[ref.key][1])
        if replaced is not None:
            self.bank.retire(replaced.handle)
        self._forget_read(ref.key)
        return resident

    def _forget_read(self, key: tuple) -> None:
        self._asked.pop(key, None)
        self._read_done.pop(key, None)
