"""Bottleneck adapters in the torch engine: the masked way, every row through the down and up projections
of every slot in the batch's range (stacked per layer and position, scaling folded into up), each row keeping
its own slot's columns after the activation; gathering each row's weights (a per-row BGMV, as in Punica) cost a
copy of both matrices per row and position (decode, 32 rows, 16 bottlenecks, bf16: 41 ms more than the base's
step, masked 22 ms). Zeroing selects (masked_fill), never multiplies, so another adapter's overflow cannot reach
a row; a freed slot is zeroed."""

from dataclasses import dataclass, field
from functools import partial

import torch

from adapters.base import AdapterCapacityError, AdapterError
from adapters.bottleneck import ACTIVATIONS, POSITIONS, BottleneckAdapter, with_delta
from server.engine.torch.kinds.base import TorchKind
from server.engine.torch.lora_stacks import grow
from server.engine.torch.packed_linear import ROW_TILE, in_row_tiles


@dataclass
class BottleneckRows:
    """The bottleneck slots the forward pass in flight runs through, and which row each serves."""

    slots: slice  # from the lowest slot the batch's rows use to the highest
    slot_of_row: torch.Tensor  # (batch,): each row's slot, 0 for none (its up bias is zero)
    foreign: torch.Tensor  # (batch, 1, columns): True where a column is not the row's own slot's
    # After the first, each activation of the range with the columns it applies to (the first: all the rest).
    activations: list[tuple[str, torch.Tensor | None]]

    @classmethod
    def of(cls, row_slots: list[int], activation: dict[int, str], size: int,
           device: torch.device | str = "cpu") -> "BottleneckRows":
        """row_slots[i]: row i's slot, 0 for none; activation: each resident slot's; size: columns a slot has."""
        used = [slot for slot in row_slots if slot]
        low, high = min(used), max(used)
        column_slots = torch.arange(low, high + 1, device=device).repeat_interleave(size)
        slot_of_row = torch.tensor(row_slots, device=device)
        names = sorted({activation[slot] for slot in used})
        by_name = [(name, torch.tensor([activation.get(s) == name for s in range(low, high + 1)], device=device)
                    .repeat_interleave(size)) for name in names[1:]]
        return cls(slice(low, high + 1), slot_of_row, (slot_of_row[:, None] != column_slots)[:, None, :],
                   [(names[0], None), *by_name])


@dataclass
class BottleneckStacks:
    """Stacked bottleneck weights, (layers, 2 positions, slots, ...), so that a slot range of one layer and
    position flattens to a view: down (.., size, hidden) and its bias (.., size); up transposed
    (.., size, hidden) and its bias (.., hidden), both scaled by the slot's scaling. Plus each slot's
    activation."""

    down_weight: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    up_weight: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    activation: dict[int, str] = field(default_factory=dict)
    size: dict[int, int] = field(default_factory=dict)  # each slot's own bottleneck size (the stacks' may be wider)
    module_names: tuple[str, str, str] | None = None  # layers, attn, mlp: hooked once, shared by all


class BottleneckKind(TorchKind):
    kind = BottleneckAdapter.kind

    def __init__(self, bank):
        super().__init__(bank)
        self.rows: BottleneckRows | None = None  # the forward pass in flight's; None: no bottleneck row
        self.stacks = BottleneckStacks()
        self._free_slots = list(range(bank.max_adapters, 0, -1))  # lowest first: a batch's range stays short

    def place(self, resident) -> None:
        if not self._free_slots:
            raise AdapterCapacityError("capacity", f"all {self.bank.max_adapters} bottleneck slots are in use")
        resident.slot = self._free_slots.pop()
        try:
            self._store(resident.slot, resident.adapter)
        except Exception:
            self._free_slots.append(resident.slot)
            raise

    def free(self, resident) -> None:
        bn = self.stacks
        for stack in (bn.down_weight, bn.down_bias, bn.up_weight, bn.up_bias):
            stack[:, :, resident.slot].zero_()
        bn.activation.pop(resident.slot, None)
        bn.size.pop(resident.slot, None)
        self._free_slots.append(resident.slot)

    def bind(self, residents, chunks) -> None:
        slots = [r.slot if r is not None else 0 for r in residents]
        bn = self.stacks
        self.rows = BottleneckRows.of(slots, bn.activation, bn.down_weight.shape[3], self.bank.device) \
            if any(slots) else None

    def _store(self, slot: int, adapter: BottleneckAdapter) -> None:
        c, bn, cast = adapter.config, self.stacks, self.bank.cast
        names = (c.layers_module, c.attn_module, c.mlp_module)
        if bn.module_names is None:
            self._hook(adapter)
            bn.module_names = names
        elif bn.module_names != names:
            raise AdapterError("layers_module", f"bottleneck adapters on this server wrap {bn.module_names}, "
                                                f"this one {names}")
        slots, layers, r, hidden = slot + 1, c.num_layers, c.bottleneck_size, c.hidden_size
        like = next(self.bank.model.parameters())
        # A slot narrower than the widest adds zero columns: act(0 + 0) = 0 for every activation offered.
        bn.down_weight = grow(bn.down_weight, (layers, 2, slots, r, hidden), like, dim=2)
        bn.down_bias = grow(bn.down_bias, (layers, 2, slots, r), like, dim=2)
        bn.up_weight = grow(bn.up_weight, (layers, 2, slots, r, hidden), like, dim=2)
        bn.up_bias = grow(bn.up_bias, (layers, 2, slots, hidden), like, dim=2)
        for stack in (bn.down_weight, bn.down_bias, bn.up_weight, bn.up_bias):
            stack[:, :, slot].zero_()
        bn.down_weight[:, :, slot, :r] = cast(adapter.down_weight, "down.weight")
        bn.down_bias[:, :, slot, :r] = cast(adapter.down_bias, "down.bias")
        bn.up_weight[:, :, slot, :r] = cast(adapter.up_weight.transpose(-1, -2), "up.weight", scale=c.scaling)
        bn.up_bias[:, :, slot] = cast(adapter.up_bias, "up.bias", scale=c.scaling)
        bn.activation[slot] = c.non_linearity
        bn.size[slot] = r

    def _hook(self, adapter: BottleneckAdapter) -> None:
        for layer in range(adapter.config.num_layers):
            for p, position in enumerate(POSITIONS):
                module = self.bank.model.get_submodule(adapter.module_name(layer, position))
                module.register_forward_hook(self._hook_at(layer, p))

    def _hook_at(self, layer: int, p: int):
        def hook(_module, _inputs, output):
            if self.rows is None:
                return output
            return with_delta(output, lambda h: self._with_bottlenecks(h, layer, p))
        return hook

    def _with_bottlenecks(self, h: torch.Tensor, layer: int, p: int) -> torch.Tensor:
        """h (batch, tokens, hidden) + each row's scaling * up(act(down(h))); h alone for rows without one."""
        if self.bank.batch_invariant:
            return self._by_slot(h, layer, p)
        rows, bn = self.rows, self.stacks
        hidden = h.shape[-1]
        down = bn.down_weight[layer, p, rows.slots].flatten(0, 1)  # (columns, hidden)
        up = bn.up_weight[layer, p, rows.slots].flatten(0, 1)
        flat = h.reshape(-1, hidden)
        shrunk = torch.addmm(bn.down_bias[layer, p, rows.slots].flatten(), flat, down.T)  # (batch * tokens, columns)
        (first, _), *others = rows.activations
        activated = ACTIVATIONS[first](shrunk)
        for name, columns in others:
            activated = torch.where(columns, ACTIVATIONS[name](shrunk), activated)
        activated = activated.view(h.shape[0], -1, activated.shape[-1]).masked_fill_(rows.foreign, 0.0)
        out = h + bn.up_bias[layer, p].index_select(0, rows.slot_of_row)[:, None, :]
        out.view(-1, hidden).addmm_(activated.view(-1, activated.shape[-1]), up)
        return out

    def _by_slot(self, h: torch.Tensor, layer: int, p: int) -> torch.Tensor:
        """--batch-invariant: each slot's rows through its own weights only (its own size, whatever the stacks'
        width), in row tiles, so a row's sum never depends on which other slots share the step."""
        bn, out = self.stacks, h.clone()
        for slot in self.rows.slot_of_row.unique().tolist():
            if not slot:
                continue
            r, act = bn.size[slot], ACTIVATIONS[bn.activation[slot]]
            down, down_bias = bn.down_weight[layer, p, slot, :r], bn.down_bias[layer, p, slot, :r]
            up, up_bias = bn.up_weight[layer, p, slot, :r], bn.up_bias[layer, p, slot]
            rows = (self.rows.slot_of_row == slot).nonzero().flatten()
            adapter = partial(_bottleneck, down=down, down_bias=down_bias, up=up, up_bias=up_bias, act=act)
            out.index_add_(0, rows, in_row_tiles(adapter, h[rows], ROW_TILE))
        return out


def _bottleneck(x: torch.Tensor, *, down, down_bias, up, up_bias, act) -> torch.Tensor:
    return torch.addmm(up_bias, act(torch.addmm(down_bias, x, down.T)), up)
