"""Adapters resident in the torch engine, stacked so that one forward pass mixes them row by row.

Each kind's weights live where its module in server/engine/torch/kinds/ puts them: LoRA pages in per-module stacks
(lora_stacks.py), bottleneck slots in per-layer stacks, prefix keys/values written into the KV cache at
admission, soft prompts fed as input embeddings. This bank holds what is common: each resident version, the
sequences running on it (a replaced or deleted version is freed when the last of them ends), the merged LoRA,
the cast every weight takes once at load, and binding each row of a forward pass to its adapter.
Weights are checked finite at load, in the engine's precision too (a float32 value beyond bf16's range rounds
to inf): an inf in a stack every row's matmul reads would reach other adapters' rows (0 * inf = NaN).
All methods run on the engine thread, between forward passes.
"""

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.base import AdapterError
from adapters.loading import Adapter
from server.engine.torch.kinds import KINDS, TorchKind
from server.engine.torch.kv_cache import PagedKVCache
from server.host import dtype_name


@dataclass(eq=False)
class Resident:
    """One loaded adapter version; sequences hold it, so a replaced version lives until they finish."""

    name: str
    adapter: Adapter
    slot: int = 0  # a bottleneck adapter's, in the bottleneck stacks
    pages: dict[str, tuple[int, ...]] = field(default_factory=dict)  # a LoRA's, in its modules' stacks, by pool
    num_active: int = 0
    is_retired: bool = False
    serial: int = field(default_factory=itertools.count(1).__next__)  # names this version in the prefix cache


class AdapterBank:
    def __init__(self, model: nn.Module, max_adapters: int, kv_dtype: torch.dtype, *, batch_invariant: bool = False):
        self.model, self.max_adapters = model, max_adapters
        # Each adapter's rows computed apart, in row tiles, and a merge exact for every other row (--batch-invariant).
        self.batch_invariant = batch_invariant
        self.merged: Resident | None = None
        self._merges = 0  # merges and unmerges so far: the base weights' version
        self.dtype = next(model.parameters()).dtype
        self.kv_dtype = kv_dtype  # prefix keys/values go straight into the KV cache
        self.device = next(model.parameters()).device
        self.kinds: dict[str, TorchKind] = {kind.kind: kind(self) for kind in KINDS}

    def place(self, name: str, adapter: Adapter) -> Resident:
        """Put `adapter` on the device as a version of `name`; it stays until retired and idle."""
        resident = Resident(name, adapter)
        self.kinds[adapter.kind].place(resident)
        return resident

    def cast(self, weights: torch.Tensor, field: str, dtype: torch.dtype | None = None,
              scale: float = 1.0) -> torch.Tensor:
        """On the engine's device in `dtype`. Moved first, then cast there: a pinned host tensor's copy to a GPU
        does not wait for the device (a cast on the host would make an unpinned copy first); scaled in the
        adapter's own precision, before the one rounding to the engine's. A value beyond that precision's
        range is refused, naming `field`: the loaders check finiteness in the file's precision, and an inf
        in a stack every row's matmul reads would reach other adapters' rows (0 * inf = NaN)."""
        dtype = dtype or self.dtype
        largest = torch.finfo(dtype).max
        if largest < torch.finfo(weights.dtype).max and weights.numel() and weights.abs().amax() * abs(scale) > largest:
            raise AdapterError(field, f"holds values beyond {dtype_name(dtype)}'s range (+-{largest:.4g}), "
                                      "the engine's precision")
        moved = weights.to(self.device, non_blocking=True)
        return (moved * scale if scale != 1.0 else moved).to(dtype)

    def acquire(self, resident: Resident) -> None:
        resident.num_active += 1

    def release(self, resident: Resident) -> None:
        resident.num_active -= 1
        if resident.is_retired and resident.num_active == 0:
            self.kinds[resident.adapter.kind].free(resident)

    def retire(self, resident: Resident) -> None:
        """`resident` takes no new sequences; its weights free once the last running one ends."""
        resident.is_retired = True
        if resident.num_active == 0:
            self.kinds[resident.adapter.kind].free(resident)

    def merge(self, resident: Resident) -> None:
        """Fold `resident` (a LoRA) into the base weights, unmerging any other first."""
        if self.merged is resident:
            return
        self.unmerge()
        self.kinds[resident.adapter.kind].fold(resident)
        self.merged = resident
        self._merges += 1

    def unmerge(self) -> None:
        """Restore the base weights exactly (from the copies the fold kept)."""
        if self.merged is not None:
            self.kinds[self.merged.adapter.kind].unfold()
            self.merged = None
            self._merges += 1

    def cache_root(self, resident: Resident | None, salt: str | None) -> bytes:
        """What besides its tokens decides which cached blocks a sequence may share: its adapter version and
        the base weights' (a merge changes every row's rounding; cached blocks of an earlier version are never
        matched again and age out), and the request's cache salt."""
        root = f"{resident.serial if resident is not None else 0}/{self._merges}"
        return (root if salt is None else f"{root}|{salt}").encode()

    def bind(self, residents: list[Resident | None], chunks: list[slice] = ()) -> None:
        """Point every row at its adapter for the next forward pass. `chunks`: row ranges of a packed step after
        all its other rows, each one sequence's prefill tokens (so of one adapter)."""
        for kind in self.kinds.values():
            kind.bind([r if r is not None and r.adapter.kind == kind.kind else None for r in residents], chunks)

    def admit(self, resident: Resident, blocks: list[int], cache: PagedKVCache) -> bool:
        """True when `resident`'s kind wrote the sequence's virtual positions into its blocks itself."""
        return self.kinds[resident.adapter.kind].admit(resident, blocks, cache)

    def soft_prompt(self, resident: Resident) -> torch.Tensor | None:
        return self.kinds[resident.adapter.kind].soft_prompt(resident)
