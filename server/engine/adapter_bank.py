"""Adapters resident in the torch engine, stacked so that one forward pass mixes them row by row.

LoRA and bottleneck weights sit in per-module stacks indexed by slot (slot 0: "no adapter"). A LoRA
layer computes the batch's LoRA rows one of two ways, whichever is faster for the shape (measured by
benchmarks/lora_kernels.py): masked, every row through the A and B of every slot in the range its rows
use, in one matmul each, keeping each row's own block of the shrunk activations (best for decode steps
with small ranks: one pass, no copies); or grouped (SGMV-like, as in Punica and S-LoRA), the rows gathered
by slot into a padded (slots, rows, ...) batch and run through one batched matmul per projection, so the
cost follows the rows and ranks used, not slots x rows (best for prefill, and for many or wide adapters).
Zeroing selects (masked_fill), never multiplies, so another slot's overflow (inf * 0 = NaN) cannot reach a
row; weights are checked finite at load, and freed slots are zeroed. Bottleneck layers gather each row's
weights (a per-row BGMV as in Punica).
Prompt-tuning rows get their soft prompt as input embeddings and prefix-tuning rows their keys/values
written into the KV cache at admission (see the scheduler); neither needs anything inside the model.
One LoRA at a time can be merged: folded into the base weights, so its rows run with no LoRA at all.
Every other row then gets the fold taken back out by a compensating LoRA (-B'A', which with a row's
own BA is the [B, -B'][A; A'] of the design), and the original weights are kept to restore exactly.
All methods run on the engine thread, between forward passes.
"""

import itertools
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from adapters.base import AdapterCapacityError, AdapterError
from adapters.bottleneck import ACTIVATIONS, POSITIONS, BottleneckAdapter, with_delta
from adapters.loading import Adapter
from adapters.lora import LoraAdapter
from adapters.prefix import PrefixAdapter
from adapters.prompt import PromptAdapter


def _grow(stack: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A zero stack of at least `shape`, keeping what `stack` held."""
    if stack is not None and all(have >= want for have, want in zip(stack.shape, shape)):
        return stack
    if stack is not None:
        shape = tuple(max(have, want) for have, want in zip(stack.shape, shape))
    grown = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if stack is not None:
        grown[tuple(slice(0, n) for n in stack.shape)] = stack
    return grown


# When the grouped LoRA kernel wins (benchmarks/lora_kernels.py, both dtypes): in float32 for every prefill
# of two or more slots, and for decode once the masked matmul would be this many columns wide (slots in range
# x rank); in bf16, whose batched matmuls are slow on CPU, for prefill that wide only.
GROUPED_MIN_COLUMNS = 128


@dataclass
class RowAdapters:
    """Per-row slot indices for the forward pass in flight (None: no row of that kind)."""

    lora: torch.Tensor | None = None  # [batch], 0 for rows without a LoRA
    lora_range: tuple[int, int] = (0, 0)  # lowest and highest LoRA slot in the batch
    _lora_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    # Grouped: each LoRA slot of the batch, its rows (padded with row 0) and where the padding is.
    lora_group_slots: torch.Tensor | None = None  # (groups,)
    lora_group_rows: torch.Tensor | None = None  # (groups, most rows of one slot)
    lora_group_padding: torch.Tensor | None = None  # (groups, most rows, 1, 1)
    bottleneck: torch.Tensor | None = None  # [batch]
    bottleneck_scaling: torch.Tensor | None = None  # [batch], 0 for rows without one
    bottleneck_activations: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (name, rows)
    merged_rows: torch.Tensor | None = None  # (batch, 1, 1): True for the merged LoRA's own rows

    def lora_foreign(self, rank: int) -> torch.Tensor:
        """(batch, 1, slots_in_range * rank): True outside each row's own slot block."""
        if rank not in self._lora_masks:
            low, high = self.lora_range
            column_slot = torch.arange((high - low + 1) * rank, device=self.lora.device) // rank + low
            self._lora_masks[rank] = (self.lora[:, None] != column_slot[None, :])[:, None, :]
        return self._lora_masks[rank]

    def is_lora_grouped(self, tokens: int, rank: int, dtype: torch.dtype) -> bool:
        low, high = self.lora_range
        if len(self.lora_group_slots) < 2:
            return False
        is_wide = (high - low + 1) * rank >= GROUPED_MIN_COLUMNS
        return tokens > 1 or is_wide if dtype == torch.float32 else tokens > 1 and is_wide

    def group_lora_rows(self) -> None:
        slots = self.lora.tolist()
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                groups.setdefault(slot, []).append(row)
        width = max(map(len, groups.values()))
        device = self.lora.device
        self.lora_group_slots = torch.tensor(list(groups), device=device)
        self.lora_group_rows = torch.tensor([rows + [0] * (width - len(rows)) for rows in groups.values()],
                                            device=device)
        self.lora_group_padding = torch.tensor([[i >= len(rows) for i in range(width)] for rows in groups.values()],
                                               device=device)[:, :, None, None]


def lora_masked(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: RowAdapters) -> None:
    """y += each row's B A x, through every slot of the batch's range (a, b: the stacks, in range)."""
    rank = a.shape[1]
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # (slots_in_range * rank, in / out)
    # (batch, tokens, slots_in_range * rank), zero outside each row's own block
    shrunk = (x @ a.T).masked_fill_(rows.lora_foreign(rank)[:, :, : a.shape[0]], 0.0)
    # In place: a second (batch, tokens, out) tensor per layer costs a prefill more than the matmuls.
    y.view(-1, y.shape[-1]).addmm_(shrunk.view(-1, shrunk.shape[-1]), b)


def lora_grouped(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: RowAdapters) -> None:
    """y += each row's B A x, rows gathered by slot (a, b: the whole stacks)."""
    slots, index, padding = rows.lora_group_slots, rows.lora_group_rows, rows.lora_group_padding
    if int(slots.max()) >= a.shape[0]:  # slots of adapters that leave this layer alone: nothing to add
        kept = slots < a.shape[0]
        slots, index, padding = slots[kept], index[kept], padding[kept]
        if not len(slots):
            return
    groups, tokens = index.shape[0], x.shape[1]
    gathered = x[index].view(groups, -1, x.shape[-1])  # (groups, rows * tokens, in)
    shrunk = torch.bmm(gathered, a[slots].transpose(1, 2))  # (groups, rows * tokens, rank)
    shrunk.view(groups, -1, tokens, shrunk.shape[-1]).masked_fill_(padding, 0.0)  # padding adds nothing to row 0
    out = torch.bmm(shrunk, b[slots])  # (groups, rows * tokens, out)
    y.index_add_(0, index.view(-1), out.view(-1, tokens, out.shape[-1]))


class BatchedLoraLinear(nn.Module):
    """y = base(x) + B[slot] A[slot] x with the slot chosen per row; scale is folded into B."""

    def __init__(self, base: nn.Linear, bank: "AdapterBank"):
        super().__init__()
        self.base, self._bank = base, bank
        self.a: torch.Tensor | None = None  # (slots, rank, in); ranks below the widest are zero-padded
        self.b: torch.Tensor | None = None  # (slots, rank, out): B transposed, so slot ranges flatten to views
        # While a LoRA is merged here: the weight before the fold, and the fold's A (rank, in) and -B^T (rank, out).
        self._unfolded: torch.Tensor | None = None
        self._compensation: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (batch, tokens, in)
        y = self.base(x)
        rows = self._bank.rows
        if rows.lora is not None and self.a is not None and rows.lora_range[0] < self.a.shape[0]:
            if rows.is_lora_grouped(x.shape[1], self.a.shape[1], x.dtype):
                lora_grouped(x, y, self.a, self.b, rows)
            else:
                low, high = rows.lora_range[0], min(rows.lora_range[1], self.a.shape[0] - 1)
                lora_masked(x, y, self.a[low : high + 1], self.b[low : high + 1], rows)
        if self._compensation is not None and rows.merged_rows is not None:
            a, negated_b = self._compensation
            shrunk = (x @ a.T).masked_fill_(rows.merged_rows, 0.0)  # (batch, tokens, rank)
            y.view(-1, y.shape[-1]).addmm_(shrunk.view(-1, shrunk.shape[-1]), negated_b)
        return y

    def fold(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """W += B A (b already scaled); other rows get -B A back through the compensation."""
        self._unfolded = self.base.weight.detach().clone()
        self.base.weight.data.addmm_(b, a)
        self._compensation = (a, -b.T.contiguous())

    def unfold(self) -> None:
        if self._unfolded is not None:
            self.base.weight.data.copy_(self._unfolded)
        self._unfolded = self._compensation = None

    def store(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put one adapter's A (rank, in) and B (out, rank) into `slot`; None clears the slot."""
        if a is None:
            if self.a is not None and slot < self.a.shape[0]:
                self.a[slot].zero_()
                self.b[slot].zero_()
            return
        rank = a.shape[0]
        self.a = _grow(self.a, (slot + 1, rank, self.base.in_features), self.base.weight)
        self.b = _grow(self.b, (slot + 1, rank, self.base.out_features), self.base.weight)
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :rank] = a
        self.b[slot, :rank] = b.T


@dataclass
class _Bottlenecks:
    """Stacked bottleneck weights: (slots, layers, 2 positions, ...), plus per-slot scaling and activation."""

    down_weight: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    up_weight: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    scaling: dict[int, float] = field(default_factory=dict)
    activation: dict[int, str] = field(default_factory=dict)
    module_names: tuple[str, str, str] | None = None  # layers, attn, mlp: hooked once, shared by all


@dataclass(eq=False)
class Resident:
    """One loaded adapter version; sequences hold it, so a replaced version lives until they finish."""

    name: str
    adapter: Adapter
    slot: int  # in the LoRA or bottleneck stacks; 0 for prefix/prompt
    num_active: int = 0
    is_retired: bool = False
    serial: int = field(default_factory=itertools.count(1).__next__)  # names this version in the prefix cache


class AdapterBank:
    def __init__(self, model: nn.Module, max_adapters: int, kv_dtype: torch.dtype):
        self.model, self.max_adapters = model, max_adapters
        self.rows = RowAdapters()
        self._by_name: dict[str, Resident] = {}
        # One pool per stacked kind, lowest slot first: a batch's LoRA slot range stays short.
        self._free_slots = {kind: list(range(max_adapters, 0, -1)) for kind in ("lora", "bottleneck")}
        self._lora_modules: dict[str, BatchedLoraLinear] = {}
        self._bottlenecks = _Bottlenecks()
        self.merged: Resident | None = None
        self._merges = 0  # merges and unmerges so far: the base weights' version
        self._dtype = next(model.parameters()).dtype
        self._kv_dtype = kv_dtype  # prefix keys/values go straight into the KV cache
        self._device = next(model.parameters()).device

    # -- lifecycle ---------------------------------------------------------------------------------------

    def load(self, name: str, adapter: Adapter) -> None:
        """Make `adapter` servable as `name`; a previous version keeps serving the sequences that hold it."""
        slot = 0  # prefix and prompt adapters need no stacked weights
        if isinstance(adapter, PrefixAdapter):  # cast once here, not at every admission or step
            adapter = replace(adapter, keys=self._cast(adapter.keys, self._kv_dtype),
                              values=self._cast(adapter.values, self._kv_dtype))
        elif isinstance(adapter, PromptAdapter):
            adapter = replace(adapter, embeddings=self._cast(adapter.embeddings))
        elif isinstance(adapter, (LoraAdapter, BottleneckAdapter)):
            free = self._free_slots[adapter.kind]
            if not free:
                raise AdapterCapacityError("capacity", f"all {self.max_adapters} {adapter.kind} slots are in use")
            slot = free.pop()
            try:
                if isinstance(adapter, LoraAdapter):
                    self._store_lora(slot, adapter)
                else:
                    self._store_bottleneck(slot, adapter)
            except Exception:
                free.append(slot)
                raise
        previous = self._by_name.get(name)
        self._by_name[name] = Resident(name, adapter, slot)
        if previous is not None:
            self._retire(previous)

    def _cast(self, weights: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return weights.to(self._device, dtype or self._dtype)

    def unload(self, name: str) -> None:
        resident = self._by_name.pop(name, None)
        if resident is not None:
            self._retire(resident)

    def merge(self, name: str) -> None:
        """Fold LoRA `name` into the base weights (unmerging any other first)."""
        resident = self._by_name.get(name)
        if resident is None or not isinstance(resident.adapter, LoraAdapter):
            raise AdapterError("model", f"`{name}` is not a loaded LoRA adapter")
        if self.merged is resident:
            return
        self.unmerge()
        for module, (a, b) in resident.adapter.scaled().items():
            self._lora_modules[module].fold(self._cast(a), self._cast(b))
        self.merged = resident
        self._merges += 1

    def unmerge(self) -> None:
        """Restore the base weights exactly (from the copies the fold kept)."""
        if self.merged is not None:
            for wrapper in self._lora_modules.values():
                wrapper.unfold()
            self.merged = None
            self._merges += 1

    def cache_root(self, resident: Resident | None, salt: str | None) -> bytes:
        """What besides its tokens decides which cached blocks a sequence may share: its adapter version and
        the base weights' (a merge changes every row's rounding; cached blocks of an earlier version are never
        matched again and age out), and the request's cache salt."""
        root = f"{resident.serial if resident is not None else 0}/{self._merges}"
        return (root if salt is None else f"{root}|{salt}").encode()

    def acquire(self, name: str) -> Resident:
        resident = self._by_name.get(name)
        if resident is None:
            raise AdapterError("model", f"adapter `{name}` is not loaded")
        resident.num_active += 1
        return resident

    def release(self, resident: Resident) -> None:
        resident.num_active -= 1
        if resident.is_retired and resident.num_active == 0:
            self._free(resident)

    def _retire(self, resident: Resident) -> None:
        resident.is_retired = True
        if resident.num_active == 0:
            self._free(resident)

    def _free(self, resident: Resident) -> None:
        """Zero the slot (a batch's slot range may span it) and return it to its pool."""
        if not resident.slot:
            return
        if isinstance(resident.adapter, LoraAdapter):
            for wrapper in self._lora_modules.values():
                wrapper.store(resident.slot, None, None)
        else:
            bn = self._bottlenecks
            for stack in (bn.down_weight, bn.down_bias, bn.up_weight, bn.up_bias):
                stack[resident.slot].zero_()
            bn.scaling.pop(resident.slot, None)
            bn.activation.pop(resident.slot, None)
        self._free_slots[resident.adapter.kind].append(resident.slot)

    # -- per forward pass --------------------------------------------------------------------------------

    def bind(self, residents: list[Resident | None]) -> None:
        """Point every row at its adapter's slot for the next forward pass."""
        merged = self.merged
        # The merged LoRA is in the base weights: its rows need no slot, every other row the compensation.
        is_merged = [merged is not None and r is merged for r in residents]
        residents = [None if m else r for r, m in zip(residents, is_merged)]
        slots = [r.slot if r is not None else 0 for r in residents]

        def index_for(kind: type) -> torch.Tensor | None:
            if not any(r is not None and isinstance(r.adapter, kind) for r in residents):
                return None
            kept = [s if r is not None and isinstance(r.adapter, kind) else 0 for s, r in zip(slots, residents)]
            return torch.tensor(kept, device=self._device)

        rows = RowAdapters(lora=index_for(LoraAdapter), bottleneck=index_for(BottleneckAdapter))
        if merged is not None and not all(is_merged):  # a batch of only the merged adapter runs as the base does
            rows.merged_rows = torch.tensor(is_merged, device=self._device)[:, None, None]
        if rows.lora is not None:
            used = [s for s, r in zip(slots, residents) if r is not None and isinstance(r.adapter, LoraAdapter)]
            rows.lora_range = (min(used), max(used))
            rows.group_lora_rows()
        if rows.bottleneck is not None:
            bn, kept = self._bottlenecks, rows.bottleneck.tolist()
            rows.bottleneck_scaling = torch.tensor([bn.scaling.get(s, 0.0) for s in kept], device=self._device,
                                                   dtype=self._dtype)
            for name in sorted({bn.activation.get(s, "relu") for s in kept}):
                members = [i for i, s in enumerate(kept) if bn.activation.get(s, "relu") == name]
                rows.bottleneck_activations.append((name, torch.tensor(members, device=self._device)))
        self.rows = rows

    # -- LoRA --------------------------------------------------------------------------------------------

    def _store_lora(self, slot: int, adapter: LoraAdapter) -> None:
        modules = dict(self.model.named_modules())
        for name in adapter.layers.keys() - self._lora_modules.keys():
            self._wrap_linear(name, modules[name])
        # Every wrapped layer is written, so layers this adapter leaves alone hold no earlier tenant's weights.
        for name, wrapper in self._lora_modules.items():
            weights = adapter.layers.get(name)
            if weights is None:
                wrapper.store(slot, None, None)
            else:
                # Scaled in float32, then cast: the adapter's own precision until the one rounding to the engine's.
                wrapper.store(slot, self._cast(weights.a), self._cast(weights.b * weights.scale))

    def _wrap_linear(self, name: str, linear: nn.Module) -> BatchedLoraLinear:
        parent_name, _, child = name.rpartition(".")
        wrapper = BatchedLoraLinear(linear, self)
        setattr(self.model.get_submodule(parent_name), child, wrapper)
        self._lora_modules[name] = wrapper
        return wrapper

    # -- bottleneck --------------------------------------------------------------------------------------

    def _store_bottleneck(self, slot: int, adapter: BottleneckAdapter) -> None:
        c, bn = adapter.config, self._bottlenecks
        names = (c.layers_module, c.attn_module, c.mlp_module)
        if bn.module_names is None:
            self._hook_bottlenecks(adapter)
            bn.module_names = names
        elif bn.module_names != names:
            raise AdapterError("layers_module", f"bottleneck adapters on this server wrap {bn.module_names}, "
                                                f"this one {names}")
        slots, layers, r, hidden = slot + 1, c.num_layers, c.bottleneck_size, c.hidden_size
        like = next(self.model.parameters())
        bn.down_weight = _grow(bn.down_weight, (slots, layers, 2, r, hidden), like)
        bn.down_bias = _grow(bn.down_bias, (slots, layers, 2, r), like)
        bn.up_weight = _grow(bn.up_weight, (slots, layers, 2, hidden, r), like)
        bn.up_bias = _grow(bn.up_bias, (slots, layers, 2, hidden), like)
        for stack in (bn.down_weight, bn.down_bias, bn.up_weight, bn.up_bias):
            stack[slot].zero_()
        bn.down_weight[slot, :, :, :r] = adapter.down_weight.to(like)
        bn.down_bias[slot, :, :, :r] = adapter.down_bias.to(like)
        bn.up_weight[slot, :, :, :, :r] = adapter.up_weight.to(like)
        bn.up_bias[slot] = adapter.up_bias.to(like)
        bn.scaling[slot], bn.activation[slot] = c.scaling, c.non_linearity

    def _hook_bottlenecks(self, adapter: BottleneckAdapter) -> None:
        for layer in range(adapter.config.num_layers):
            for p, position in enumerate(POSITIONS):
                module = self.model.get_submodule(adapter.module_name(layer, position))
                module.register_forward_hook(self._bottleneck_hook(layer, p))

    def _bottleneck_hook(self, layer: int, p: int):
        def hook(_module, _inputs, output):
            if self.rows.bottleneck is None:
                return output
            return with_delta(output, lambda h: h + self._bottleneck_delta(h, layer, p))
        return hook

    def _bottleneck_delta(self, h: torch.Tensor, layer: int, p: int) -> torch.Tensor:
        """h (batch, tokens, hidden) -> each row's scaling * up(act(down(h))); zero for rows without one."""
        rows, bn = self.rows, self._bottlenecks
        index = rows.bottleneck
        down = torch.bmm(h, bn.down_weight[index, layer, p].transpose(1, 2)) + bn.down_bias[index, layer, p][:, None]
        activated = torch.empty_like(down)
        for name, members in rows.bottleneck_activations:
            activated[members] = ACTIVATIONS[name](down[members])
        up = torch.bmm(activated, bn.up_weight[index, layer, p].transpose(1, 2)) + bn.up_bias[index, layer, p][:, None]
        return up * rows.bottleneck_scaling[:, None, None]
