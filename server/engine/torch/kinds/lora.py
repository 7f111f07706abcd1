"""LoRA in the torch engine: paged per-module stacks (server/engine/torch/lora_stacks.py) that every row's LoRA
reads its pages of, and at most one LoRA folded into the base weights (merged): its rows run with no LoRA,
every other row gets the fold taken back out by a compensating LoRA (-B'A', which with a row's own BA is the
[B, -B'][A; A'] of the design), and the original weights are kept to restore exactly. Under --batch-invariant
the fold is a copy its rows run through, and every other row keeps the original weights: exact in bf16."""

import torch
from torch import nn

from adapters.base import AdapterCapacityError, AdapterError
from adapters.lora import LoraAdapter
from server.engine.torch.kinds.base import TorchKind
from server.engine.torch.lora_stacks import (LORA_PAGE_RANK, BatchedLoraLinear, LoraBatch, LoraRows, PagePool,
                                             as_slice, lora_pool)


class LoraKind(TorchKind):
    kind = LoraAdapter.kind

    def __init__(self, bank):
        super().__init__(bank)
        self.rows = LoraBatch()  # the forward pass in flight's
        self.modules: dict[str, BatchedLoraLinear] = {}  # every linear layer a LoRA has written, wrapped
        self._pools: dict[str, PagePool] = {}  # by `lora_pool`
        self.num_resident = 0  # LoRA versions holding pages (at most the bank's max_adapters)
        # For lora_sparse (never used under --batch-invariant): torch's CPU sparse kernels take float32 only.
        self.keeps_float32 = bank.device.type == "cpu" and bank.dtype != torch.float32 and not bank.batch_invariant

    def place(self, resident) -> None:
        if self.num_resident >= self.bank.max_adapters:
            raise AdapterCapacityError("capacity", f"all {self.bank.max_adapters} LoRA slots are in use")
        count = -(-resident.adapter.rank // LORA_PAGE_RANK)
        resident.pages = {pool: self._pools.setdefault(pool, PagePool()).take(count)
                          for pool in dict.fromkeys(map(lora_pool, resident.adapter.layers))}
        try:
            self._store(resident.pages, resident.adapter)
        except Exception:
            self._clear(resident)
            raise
        self.num_resident += 1

    def free(self, resident) -> None:
        self._clear(resident)
        self.num_resident -= 1

    def bind(self, residents, chunks) -> None:
        merged = self.bank.merged
        # The merged LoRA is in the base weights: its rows need no pages, every other row the compensation.
        is_merged = [merged is not None and r is merged for r in residents]
        residents = [None if m or r is None or not r.pages else r for r, m in zip(residents, is_merged)]
        split = chunks[0].start if chunks else None
        self.rows = LoraBatch(layers=self._layer_rows(residents[:split]), chunks=self._chunks(residents, chunks),
                              split=split)
        if merged is not None and not all(is_merged):  # a batch of only the merged adapter runs as the base does
            self.rows.merged_rows = torch.tensor(is_merged, device=self.bank.device)[:, None, None]

    def fold(self, resident) -> None:
        for module, (a, b) in resident.adapter.scaled().items():  # cast at load already, so in range
            self.modules[module].fold(self.bank.cast(a, f"{module}.lora_A"), self.bank.cast(b, f"{module}.lora_B"))
        # W + BA may still overflow, and merged weights serve every row: refused, the base restored.
        overflowing = [module for module in resident.adapter.layers
                       if not torch.isfinite(self.modules[module].folded_weight).all()]
        if overflowing:
            self.unfold()
            raise AdapterError("name", f"merging `{resident.name}` overflows the base weights of `{overflowing[0]}`")

    def unfold(self) -> None:
        for wrapper in self.modules.values():
            wrapper.unfold()

    def _layer_rows(self, residents) -> dict[str, LoraRows]:
        """Each layer's LoRA rows; layers that the same adapters of the batch write share one."""
        writers: dict[str, list] = {}
        for resident in dict.fromkeys(r for r in residents if r is not None):
            for layer in resident.adapter.layers:
                writers.setdefault(layer, []).append(resident)
        shared: dict[tuple, LoraRows] = {}
        rows: dict[str, LoraRows] = {}
        for layer, adapters in writers.items():
            pool = lora_pool(layer)
            key = pool, tuple(adapters)
            if key not in shared:
                shared[key] = LoraRows.of([r.pages[pool] if r in adapters else () for r in residents],
                                          self.bank.device)
            rows[layer] = shared[key]
        return rows

    def _chunks(self, residents, chunks: list[slice]) -> dict[str, list[tuple[slice, slice | torch.Tensor]]]:
        """By layer, the chunks whose LoRA writes it: (their rows, that LoRA's pages there)."""
        by_layer: dict[str, list[tuple[slice, slice | torch.Tensor]]] = {}
        for chunk in chunks:
            resident = residents[chunk.start]
            if resident is None:
                continue
            pages = {pool: as_slice(numbers, self.bank.device) for pool, numbers in resident.pages.items()}
            for layer in resident.adapter.layers:
                by_layer.setdefault(layer, []).append((chunk, pages[lora_pool(layer)]))
        return by_layer

    def _store(self, pages: dict[str, tuple[int, ...]], adapter: LoraAdapter) -> None:
        modules = dict(self.bank.model.named_modules())
        for name in adapter.layers.keys() - self.modules.keys():
            self._wrap_linear(name, modules[name])
        # Layers this adapter leaves alone keep its pages zero, as every free page is: `_clear` zeroes what an
        # adapter wrote when it leaves, so no earlier tenant's weights remain.
        for name, weights in adapter.layers.items():
            self.modules[name].store(pages[lora_pool(name)], self.bank.cast(weights.a, f"{name}.lora_A"),
                                     self.bank.cast(weights.b, f"{name}.lora_B", scale=weights.scale))

    def _clear(self, resident) -> None:
        """Zero the pages in every layer the adapter may have written, and give them back."""
        for name in resident.adapter.layers:
            if name in self.modules:
                self.modules[name].clear(resident.pages[lora_pool(name)])
        for pool, pages in resident.pages.items():
            self._pools[pool].free += pages

    def _wrap_linear(self, name: str, linear: nn.Module) -> BatchedLoraLinear:
        parent_name, _, child = name.rpartition(".")
        wrapper = BatchedLoraLinear(name, linear, self)
        setattr(self.bank.model.get_submodule(parent_name), child, wrapper)
        self.modules[name] = wrapper
        return wrapper
