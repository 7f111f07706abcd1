"""Adapters resident in the torch engine, stacked so that one forward pass mixes them row by row.

LoRA and bottleneck weights sit in per-module stacks (index 0: "no adapter"). LoRA stacks are paged, as
S-LoRA pages adapters: a page holds LORA_PAGE_RANK rank rows, and a LoRA of rank r holds ceil(r / 8)
pages, so a batch's LoRA matmuls are as wide as the ranks it uses, not its adapters x the widest rank,
whatever ranks share the batch. Each layer runs only the pages of the batch's adapters that have weights
there (a q/v LoRA adds nothing to the MLP's cost), and pages are numbered per projection (the q_proj of
every layer shares one numbering), so an MLP's range spans only the LoRAs that write MLPs. A LoRA layer
computes its rows one of four ways, whichever is faster for the shape (measured by
benchmarks/lora_kernels.py): masked, every row through the A and B of every page in the range its rows
use, in one matmul each, keeping each row's own pages' columns of the shrunk activations (best with few
columns: one pass, no copies); sparse (on a CPU), only each row's own columns computed, the shrink
sampled at them (SDDMM) and the expand a sparse-dense matmul (SpMM), so the cost follows the ranks each
row uses (best for decode and short prefill steps across many or wide adapters; torch's CPU sparse kernels
take float32 only, so a CPU engine in bf16 keeps float32 copies of its LoRA stacks for them, 2x the
stacks' memory, and runs its decode rows through them); or grouped (SGMV-like, as
in Punica and S-LoRA), the rows gathered by page into a padded (pages, rows, ...) batch and run through one
batched matmul per projection (best for short float32 prefills, and wide bf16 ones); or segmented, one
shrink and expand per LoRA over its own rows and pages (best for long float32 prefills, whose steps hold
few LoRAs). A mixed step (decode rows, then prefill chunks, one token a row) runs its decode rows one of
those ways and each chunk as one segment: a chunk's tokens share one adapter.
Bottleneck adapters run the masked way too: every row through the down and up projections of every slot in
the batch's range (stacked per layer and position, scaling folded into up), each row keeping its own slot's
columns after the activation; gathering each row's weights (a per-row BGMV, as in Punica) cost a copy of
both matrices per row and position (decode, 32 rows, 16 bottlenecks, bf16: 41 ms more than the base's
step, masked 22 ms).
Zeroing selects (masked_fill), never multiplies, so another adapter's overflow (inf * 0 = NaN) cannot reach
a row; weights are checked finite at load, in the engine's precision too (a float32 value beyond bf16's
range rounds to inf), and freed pages and slots are zeroed.
Prompt-tuning rows get their soft prompt as input embeddings and prefix-tuning rows their keys/values
written into the KV cache at admission (see the scheduler); neither needs anything inside the model.
One LoRA at a time can be merged: folded into the base weights, so its rows run with no LoRA at all.
Every other row then gets the fold taken back out by a compensating LoRA (-B'A', which with a row's
own BA is the [B, -B'][A; A'] of the design), and the original weights are kept to restore exactly.
All methods run on the engine thread, between forward passes.
"""

import itertools
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import AdapterCapacityError, AdapterError
from adapters.bottleneck import ACTIVATIONS, POSITIONS, BottleneckAdapter, with_delta
from adapters.loading import Adapter
from adapters.lora import LoraAdapter
from adapters.prefix import PrefixAdapter
from adapters.prompt import PromptAdapter
from server.engine.packed_linear import PackedLinear
from server.host import dtype_name


def _grow(stack: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """A zero stack of at least `shape`, keeping what `stack` held. Dimension `dim` (slots, pages) at least
    doubles, so that loading adapters one by one copies the stacks a logarithmic number of times."""
    if stack is not None and all(have >= want for have, want in zip(stack.shape, shape)):
        return stack
    if stack is not None:
        shape = tuple(max(have, want) for have, want in zip(stack.shape, shape))
        if shape[dim] > stack.shape[dim]:
            shape = (*shape[:dim], max(shape[dim], 2 * stack.shape[dim]), *shape[dim + 1:])
    grown = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if stack is not None:
        grown[tuple(slice(0, n) for n in stack.shape)] = stack
    return grown


# Which LoRA kernel wins (benchmarks/lora_kernels.py, both dtypes, two or more LoRAs). In float32 on a CPU,
# sparse once the masked matmul would be SPARSE_MIN_COLUMNS wide (pages in range x page rank), for steps of at
# most SPARSE_MAX_ROWS token rows (decode, 32 rows, 16 rank-8 LoRAs, 576->1536: masked 159 us, grouped 169,
# sparse 65; 16 rank-64: 1240, 1028, 288; a whole decode step of 16 all-linear LoRAs: 0.74 -> 0.84 of the
# base's speed). In bf16 on a CPU, decode rows of two or more LoRAs go sparse whatever the width, on float32
# copies of the stacks: the masked matmul's cost grows with rows x columns, and many adapters make it wide
# (54 rows over 50 LoRAs of ranks 8-64, 576->576: masked 468 us, sparse 124; 22 rows over 12: 89 and 60);
# interleaved in one process, a decode step of 54 rows over 54 adapters of every kind took 177 -> 151 ms,
# 22 over 16 100 -> 94 ms, against 102 ms when only ranges of 64 columns or more went sparse. Beyond, grouped in
# float32 for every prefill and once the masked matmul is GROUPED_MIN_COLUMNS wide, and in bf16, whose
# batched matmuls are slow on CPU, for prefill that wide only; masked otherwise. Except that float32 prefill
# rows of SEGMENTED_MIN_TOKENS or more go segmented: one matmul pair per LoRA over its own rank, where grouped
# gathers a row's tokens once per page (a rank-64 LoRA: 8 copies). AVX2 EPYC, 2 rows x 200 tokens, a whole
# prefill step against the base's: two rank-64 all-linear LoRAs 1.97x -> 1.23x, rank 8 + rank 64 1.57x ->
# 1.14x, two rank-8 1.08x -> 1.10x. bf16 keeps its choice: measured only on a CPU without bf16 hardware.
SPARSE_MIN_COLUMNS, SPARSE_MAX_ROWS = 64, 128
GROUPED_MIN_COLUMNS = 128
SEGMENTED_MIN_TOKENS = 64


LORA_PAGE_RANK = 8  # rank rows per page of the LoRA stacks


@cache  # read for every LoRA layer of every forward pass; module names are few
def lora_pool(module: str) -> str:
    """Whose page numbering a module's LoRA stacks use: the same projection's in every layer
    (model.layers.*.mlp.up_proj). One numbering for all of them spread the range of an MLP layer over every
    q/v LoRA in between (15 LoRAs, 4 on every linear, 23 rows, bf16: a decode step 101.6 -> 86.8 ms)."""
    return re.sub(r"(^|\.)\d+\.", r"\1*.", module)


@dataclass
class _PagePool:
    """One numbering of LoRA pages (page 0: no adapter)."""

    free: list[int] = field(default_factory=list)  # given back; new ones are numbered after the highest
    count: int = 0

    def take(self, count: int) -> tuple[int, ...]:
        """The lowest `count` free pages (new ones once none is free), so that a batch's ranges stay short."""
        self.free.sort()
        pages, self.free = self.free[:count], self.free[count:]
        while len(pages) < count:
            self.count += 1
            pages.append(self.count)
        return tuple(pages)


def _as_slice(indices: list[int] | tuple[int, ...], device: torch.device | str) -> slice | torch.Tensor:
    """A slice where the indices run one after another (indexing with it is a view), else an index tensor."""
    if list(indices) == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, device=device)


@dataclass
class LoraRows:
    """The LoRA pages one layer runs through in the forward pass in flight, and which rows each serves (a
    layer's rows: those whose adapter has weights there, so a q/v LoRA costs nothing in the MLP)."""

    pages: slice  # the masked kernel's: from the lowest page the layer's rows use to the highest
    own: torch.Tensor  # (batch, pages in range): True where the page is the row's adapter's
    num_adapters: int  # distinct LoRAs among the layer's rows
    # Grouped: each page of the batch, its rows (padded with row 0) and where the padding is.
    group_pages: torch.Tensor  # (groups,)
    group_rows: torch.Tensor  # (groups, most rows of one page)
    group_padding: torch.Tensor  # (groups, most rows, 1, 1)
    rows_by_pages: dict[tuple[int, ...], list[int]]  # each LoRA's rows, by its pages
    _foreign: torch.Tensor | None = None
    _segments: list[tuple[slice | torch.Tensor, slice | torch.Tensor]] | None = None
    _patterns: dict[int, torch.Tensor] = field(default_factory=dict)  # by tokens per row

    @classmethod
    def of(cls, row_pages: list[tuple[int, ...]], device: torch.device | str = "cpu") -> "LoraRows":
        """row_pages[i]: the pages of row i's LoRA, () for none."""
        groups: dict[int, list[int]] = {}
        for row, pages in enumerate(row_pages):
            for page in pages:
                groups.setdefault(page, []).append(row)
        # Run through the whole range, other adapters' pages too: gathering just the used ones costs a copy
        # longer than the matmul time it saves (decode, 32 rows, 576->1536, bf16: 18 of 38 pages gathered
        # 163 us, the range 142 us; float32 breaks even).
        low, high = min(groups), max(groups)
        own = [[page in mine for page in range(low, high + 1)] for mine in map(set, row_pages)]
        width = max(map(len, groups.values()))
        rows_by_pages: dict[tuple[int, ...], list[int]] = {}
        for row, pages in enumerate(row_pages):
            if pages:
                rows_by_pages.setdefault(pages, []).append(row)
        return cls(slice(low, high + 1), torch.tensor(own, device=device), len(rows_by_pages),
                   torch.tensor(list(groups), device=device),
                   torch.tensor([rows + [0] * (width - len(rows)) for rows in groups.values()], device=device),
                   torch.tensor([[i >= len(rows) for i in range(width)] for rows in groups.values()],
                                device=device)[:, :, None, None],
                   rows_by_pages)

    def foreign(self) -> torch.Tensor:
        """(batch, 1, columns): True where a column of the masked kernel's pages is not the row's own."""
        if self._foreign is None:
            self._foreign = (~self.own).repeat_interleave(LORA_PAGE_RANK, dim=1)[:, None, :]
        return self._foreign

    def segments(self) -> list[tuple[slice | torch.Tensor, slice | torch.Tensor]]:
        """The segmented kernel's: each LoRA's rows and pages, as slices where they run in order (views, no
        copies), else index tensors. Made at first use: decode steps never need them."""
        if self._segments is None:
            device = self.own.device
            self._segments = [(_as_slice(rows, device), _as_slice(pages, device))
                              for pages, rows in self.rows_by_pages.items()]
        return self._segments

    def pattern(self, tokens: int) -> torch.Tensor:
        """(batch * tokens, columns) sparse CSR: where each token's row has its own pages' columns."""
        if tokens not in self._patterns:
            own = (~self.foreign()).expand(-1, tokens, -1).reshape(-1, self.foreign().shape[-1])
            with warnings.catch_warnings():  # "sparse CSR support is in beta", at every first use
                warnings.simplefilter("ignore", UserWarning)
                self._patterns[tokens] = own.float().to_sparse_csr()
        return self._patterns[tokens]

    def kernel(self, tokens: int, dtype: torch.dtype, device: torch.device) -> "LoraKernel":
        if self.num_adapters < 2:  # one LoRA: a plain matmul, no column is another's
            return lora_masked
        columns = self.own.shape[1] * LORA_PAGE_RANK
        is_float32_cpu = device.type == "cpu" and dtype == torch.float32
        is_reduced_cpu_decode = device.type == "cpu" and dtype != torch.float32 and tokens == 1  # float32 copies
        if len(self.own) * tokens <= SPARSE_MAX_ROWS and (is_reduced_cpu_decode or
                                                           is_float32_cpu and columns >= SPARSE_MIN_COLUMNS):
            return lora_sparse
        if is_float32_cpu and tokens >= SEGMENTED_MIN_TOKENS:
            return lora_segmented
        is_wide = columns >= GROUPED_MIN_COLUMNS
        is_grouped = tokens > 1 or is_wide if dtype == torch.float32 else tokens > 1 and is_wide
        return lora_grouped if is_grouped else lora_masked


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
class RowAdapters:
    """What each row of the forward pass in flight uses: LoRA pages, bottleneck slots (None: no row of
    that kind)."""

    lora: dict[str, LoraRows] = field(default_factory=dict)  # by layer; none for a layer no row's LoRA has
    bottleneck: BottleneckRows | None = None
    merged_rows: torch.Tensor | None = None  # (batch, 1, 1): True for the merged LoRA's own rows
    # A packed step's prefill chunks (rows after `lora`'s, one sequence each): by layer, each chunk's rows and
    # its LoRA's pages, run as segments. Through the masked range, each chunk's tokens would be rows of the
    # decode kernel: a served mixed step over 16 LoRAs cost 146 ms against a decode step's 90.
    chunks: dict[str, list[tuple[slice, slice | torch.Tensor]]] = field(default_factory=dict)
    split: int | None = None  # rows `lora` covers, when chunks follow them


# Each kernel: y += each row's B A x, from the whole stacks a (pages, page rank, in) and b (pages, page rank, out).
LoraKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoraRows], None]


def lora_masked(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoraRows) -> None:
    """Through every page of `rows.pages`."""
    # (pages * page rank, in / out)
    a, b = a[rows.pages].reshape(-1, a.shape[-1]), b[rows.pages].reshape(-1, b.shape[-1])
    # (batch, tokens, pages * page rank), zero outside each row's own pages
    shrunk = (x @ a.T).masked_fill_(rows.foreign(), 0.0)
    # In place: a second (batch, tokens, out) tensor per layer costs a prefill more than the matmuls.
    y.view(-1, y.shape[-1]).addmm_(shrunk.view(-1, shrunk.shape[-1]), b)


def lora_sparse(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoraRows) -> None:
    """Only each row's own pages' columns of `rows.pages`: the shrink sampled at them (SDDMM), then a
    sparse-dense matmul (SpMM). The stacks are float32 (torch's CPU sparse kernels take no other); x and y
    may be in a lower precision, converted on the way in and added once on the way out."""
    a, b = a[rows.pages].reshape(-1, a.shape[-1]), b[rows.pages].reshape(-1, b.shape[-1])
    shrunk = torch.sparse.sampled_addmm(rows.pattern(x.shape[1]), x.reshape(-1, x.shape[-1]).to(a.dtype), a.T,
                                        beta=0.0)  # beta 0: the pattern's values are not added
    if y.dtype == b.dtype:
        y.view(-1, y.shape[-1]).addmm_(shrunk, b)
    else:
        y.view(-1, y.shape[-1]).add_(torch.sparse.mm(shrunk, b))


def lora_grouped(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoraRows) -> None:
    """Rows gathered by page."""
    slots, index, padding = rows.group_pages, rows.group_rows, rows.group_padding
    groups, tokens = index.shape[0], x.shape[1]
    gathered = x[index].view(groups, -1, x.shape[-1])  # (groups, rows * tokens, in)
    shrunk = torch.bmm(gathered, a[slots].transpose(1, 2))  # (groups, rows * tokens, rank)
    shrunk.view(groups, -1, tokens, shrunk.shape[-1]).masked_fill_(padding, 0.0)  # padding adds nothing to row 0
    out = torch.bmm(shrunk, b[slots])  # (groups, rows * tokens, out)
    y.index_add_(0, index.view(-1), out.view(-1, tokens, out.shape[-1]))


def lora_segmented(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoraRows) -> None:
    """One shrink and one expand per LoRA, over its own rows and pages only (SGMV's segments, looped in Python:
    few LoRAs share a prefill step, and each runs its rank, not the range's)."""
    for row, pages in rows.segments():
        lora_segment(x, y, a, b, row, pages)


def lora_segment(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row: slice | torch.Tensor,
                 pages: slice | torch.Tensor) -> None:
    """y[row] += B A x[row] through `pages` only."""
    a_pages, b_pages = a[pages].reshape(-1, a.shape[-1]), b[pages].reshape(-1, b.shape[-1])
    shrunk = x[row] @ a_pages.T  # (its rows, tokens, its rank)
    if isinstance(row, slice):  # its rows in order: added in place
        y[row].view(-1, y.shape[-1]).addmm_(shrunk.view(-1, shrunk.shape[-1]), b_pages)
    else:
        y.index_add_(0, row, shrunk @ b_pages)


class BatchedLoraLinear(nn.Module):
    """y = base(x) + B[slot] A[slot] x with the slot chosen per row; scale is folded into B."""

    def __init__(self, name: str, base: nn.Linear, bank: "AdapterBank"):
        super().__init__()
        self.name, self.base, self._bank = name, base, bank
        # A (pages, page rank, in) and B transposed (pages, page rank, out), so page ranges flatten to views;
        # a page's rows beyond its adapter's rank are zero.
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        # Where the bank keeps them (a CPU engine in a lower precision): float32 copies of both, for lora_sparse.
        self.a_float32: torch.Tensor | None = None
        self.b_float32: torch.Tensor | None = None
        # While a LoRA is merged here: the weight before the fold (kept aside, untouched; in a tuple, which
        # nn.Module does not register as a parameter of its own), and the fold's A (rank, in) and -B^T (rank, out).
        self._merged: tuple[nn.Parameter, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (batch, tokens, in)
        y = self.base(x)
        rows = self._bank.rows
        lora = rows.lora.get(self.name)
        if lora is not None:  # its rows' adapters all wrote here, so their pages are in the stacks
            head = slice(None, rows.split)  # views: every row, or those before a packed step's chunks
            kernel = lora.kernel(x.shape[1], x.dtype, x.device)
            is_float32 = kernel is lora_sparse and self.a_float32 is not None  # a reduced-precision CPU engine's
            a, b = (self.a_float32, self.b_float32) if is_float32 else (self.a, self.b)
            kernel(x[head], y[head], a, b, lora)
        for chunk, pages in rows.chunks.get(self.name, ()):
            lora_segment(x, y, self.a, self.b, chunk, pages)
        if self._merged is not None and rows.merged_rows is not None:
            _, a, negated_b = self._merged
            shrunk = (x @ a.T).masked_fill_(rows.merged_rows, 0.0)  # (batch, tokens, rank)
            y.view(-1, y.shape[-1]).addmm_(shrunk.view(-1, shrunk.shape[-1]), negated_b)
        return y

    def fold(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """W + B A (b already scaled), in a new tensor: a weight tied to another module (an LM head shares the
        input embeddings' matrix) stays as it is there. Other rows get -B A back through the compensation."""
        original = self.base.weight
        self.base.weight = nn.Parameter(torch.addmm(original.detach(), b, a), requires_grad=False)
        self._merged = (original, a, -b.T.contiguous())
        self._base_changed()

    def unfold(self) -> None:
        if self._merged is not None:
            self.base.weight = self._merged[0]  # the original, untouched: bit for bit, and tied again
            self._merged = None
            self._base_changed()

    def _base_changed(self) -> None:
        if isinstance(self.base, PackedLinear):  # its handle holds a copy of the weight as it was
            self.base.pack()

    def store(self, pages: tuple[int, ...], a: torch.Tensor, b: torch.Tensor) -> None:
        """Put one adapter's A (rank, in) and B (out, rank) into its pages, LORA_PAGE_RANK rank rows in each
        (the pages are zero: free pages always are)."""
        self.a = _grow(self.a, (max(pages) + 1, LORA_PAGE_RANK, self.base.in_features), self.base.weight)
        self.b = _grow(self.b, (max(pages) + 1, LORA_PAGE_RANK, self.base.out_features), self.base.weight)
        padding = len(pages) * LORA_PAGE_RANK - a.shape[0]
        index = torch.tensor(pages, device=self.a.device)
        # One indexed copy per matrix, not one per page: a load runs on the engine thread, between steps.
        self.a[index] = F.pad(a, (0, 0, 0, padding)).view(len(pages), LORA_PAGE_RANK, -1)
        self.b[index] = F.pad(b.T, (0, 0, 0, padding)).view(len(pages), LORA_PAGE_RANK, -1)
        if self._bank.keeps_float32_loras:  # the same values: rounded once, to the engine's precision
            like = self.a.new_empty(0, dtype=torch.float32)
            self.a_float32 = _grow(self.a_float32, tuple(self.a.shape), like)
            self.b_float32 = _grow(self.b_float32, tuple(self.b.shape), like)
            self.a_float32[index], self.b_float32[index] = self.a[index].float(), self.b[index].float()

    def clear(self, pages: tuple[int, ...]) -> None:
        for stack in (self.a, self.b, self.a_float32, self.b_float32):
            if stack is not None:
                # long even when empty: a load that failed before the stacks grew to its pages clears none
                stack[torch.tensor([page for page in pages if page < stack.shape[0]], dtype=torch.long,
                                   device=stack.device)] = 0.0


@dataclass
class _Bottlenecks:
    """Stacked bottleneck weights, (layers, 2 positions, slots, ...), so that a slot range of one layer and
    position flattens to a view: down (.., size, hidden) and its bias (.., size); up transposed
    (.., size, hidden) and its bias (.., hidden), both scaled by the slot's scaling. Plus each slot's
    activation."""

    down_weight: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    up_weight: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    activation: dict[int, str] = field(default_factory=dict)
    module_names: tuple[str, str, str] | None = None  # layers, attn, mlp: hooked once, shared by all


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
    def __init__(self, model: nn.Module, max_adapters: int, kv_dtype: torch.dtype):
        self.model, self.max_adapters = model, max_adapters
        self.rows = RowAdapters()
        # Lowest first, so that a batch's slot and page ranges stay short.
        self._free_slots = list(range(max_adapters, 0, -1))  # bottleneck
        self._page_pools: dict[str, _PagePool] = {}  # by `lora_pool`
        self._num_loras = 0  # resident LoRA versions (at most max_adapters)
        self._lora_modules: dict[str, BatchedLoraLinear] = {}
        self._bottlenecks = _Bottlenecks()
        self.merged: Resident | None = None
        self._merges = 0  # merges and unmerges so far: the base weights' version
        self._dtype = next(model.parameters()).dtype
        self._kv_dtype = kv_dtype  # prefix keys/values go straight into the KV cache
        self._device = next(model.parameters()).device
        self.keeps_float32_loras = self._device.type == "cpu" and self._dtype != torch.float32  # for lora_sparse
        self._placers = {PrefixAdapter.kind: self._place_prefix, PromptAdapter.kind: self._place_prompt,
                         LoraAdapter.kind: self._place_lora, BottleneckAdapter.kind: self._place_bottleneck}

    # -- lifecycle ---------------------------------------------------------------------------------------

    def place(self, name: str, adapter: Adapter) -> Resident:
        """Put `adapter` on the device as a version of `name`; it stays until retired and idle."""
        resident = Resident(name, adapter)
        self._placers[adapter.kind](resident)
        return resident

    # Where each kind lives on the device: one placer per kind (its rows are bound in `bind`). Casts happen
    # once here, not at every admission or step.

    def _place_prefix(self, resident: Resident) -> None:
        adapter = resident.adapter
        resident.adapter = replace(adapter, keys=self._cast(adapter.keys, "prompt_embeddings", self._kv_dtype),
                                   values=self._cast(adapter.values, "prompt_embeddings", self._kv_dtype))

    def _place_prompt(self, resident: Resident) -> None:
        resident.adapter = replace(resident.adapter, embeddings=self._cast(resident.adapter.embeddings,
                                                                                "prompt_embeddings"))

    def _place_lora(self, resident: Resident) -> None:
        if self._num_loras >= self.max_adapters:
            raise AdapterCapacityError("capacity", f"all {self.max_adapters} LoRA slots are in use")
        count = -(-resident.adapter.rank // LORA_PAGE_RANK)
        resident.pages = {pool: self._page_pools.setdefault(pool, _PagePool()).take(count)
                          for pool in dict.fromkeys(map(lora_pool, resident.adapter.layers))}
        try:
            self._store_lora(resident.pages, resident.adapter)
        except Exception:
            self._clear_lora(resident)
            raise
        self._num_loras += 1

    def _place_bottleneck(self, resident: Resident) -> None:
        if not self._free_slots:
            raise AdapterCapacityError("capacity", f"all {self.max_adapters} bottleneck slots are in use")
        resident.slot = self._free_slots.pop()
        try:
            self._store_bottleneck(resident.slot, resident.adapter)
        except Exception:
            self._free_slots.append(resident.slot)
            raise

    def _cast(self, weights: torch.Tensor, field: str, dtype: torch.dtype | None = None,
              scale: float = 1.0) -> torch.Tensor:
        """On the engine's device in `dtype`. Moved first, then cast there: a pinned host tensor's copy to a GPU
        does not wait for the device (a cast on the host would make an unpinned copy first); scaled in the
        adapter's own precision, before the one rounding to the engine's. A value beyond that precision's
        range is refused, naming `field`: the loaders check finiteness in the file's precision, and an inf
        in a stack every row's matmul reads would reach other adapters' rows (0 * inf = NaN)."""
        dtype = dtype or self._dtype
        largest = torch.finfo(dtype).max
        if largest < torch.finfo(weights.dtype).max and weights.numel() and weights.abs().amax() * abs(scale) > largest:
            raise AdapterError(field, f"holds values beyond {dtype_name(dtype)}'s range (+-{largest:.4g}), "
                                      "the engine's precision")
        moved = weights.to(self._device, non_blocking=True)
        return (moved * scale if scale != 1.0 else moved).to(dtype)

    def merge(self, resident: Resident) -> None:
        """Fold LoRA `resident` into the base weights (unmerging any other first)."""
        name = resident.name
        if resident.adapter.kind != LoraAdapter.kind:
            raise AdapterError("name", f"only LoRA adapters fold into the weights; `{name}` is "
                                       f"{resident.adapter.kind}")
        if self.merged is resident:
            return
        self.unmerge()
        for module, (a, b) in resident.adapter.scaled().items():  # cast at load already, so in range
            self._lora_modules[module].fold(self._cast(a, f"{module}.lora_A"), self._cast(b, f"{module}.lora_B"))
        self.merged = resident
        # W + BA may still overflow, and merged weights serve every row: refused, the base restored.
        overflowing = [module for module in resident.adapter.layers
                       if not torch.isfinite(self._lora_modules[module].base.weight).all()]
        if overflowing:
            self.unmerge()
            raise AdapterError("name", f"merging `{name}` overflows the base weights of `{overflowing[0]}`")
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

    def acquire(self, resident: Resident) -> None:
        resident.num_active += 1

    def release(self, resident: Resident) -> None:
        resident.num_active -= 1
        if resident.is_retired and resident.num_active == 0:
            self._free(resident)

    def retire(self, resident: Resident) -> None:
        """`resident` takes no new sequences; its pages or slot free once the last running one ends."""
        resident.is_retired = True
        if resident.num_active == 0:
            self._free(resident)

    def _free(self, resident: Resident) -> None:
        """Zero its pages or slot (a batch's range may span them) and give them back."""
        if resident.pages:
            self._clear_lora(resident)
            self._num_loras -= 1
        elif resident.slot:
            bn = self._bottlenecks
            for stack in (bn.down_weight, bn.down_bias, bn.up_weight, bn.up_bias):
                stack[:, :, resident.slot].zero_()
            bn.activation.pop(resident.slot, None)
            self._free_slots.append(resident.slot)

    # -- per forward pass --------------------------------------------------------------------------------

    def bind(self, residents: list[Resident | None], chunks: list[slice] = ()) -> None:
        """Point every row at its adapter's pages or slot for the next forward pass. `chunks`: row ranges of a
        packed step after all its other rows, each one sequence's prefill tokens (so of one adapter)."""
        merged = self.merged
        # The merged LoRA is in the base weights: its rows need no slot, every other row the compensation.
        is_merged = [merged is not None and r is merged for r in residents]
        residents = [None if m else r for r, m in zip(residents, is_merged)]
        bottlenecks, bn = [r.slot if r is not None else 0 for r in residents], self._bottlenecks
        split = chunks[0].start if chunks else None
        rows = RowAdapters(lora=self._lora_rows(residents[:split]), chunks=self._lora_chunks(residents, chunks),
                           split=split)
        if any(bottlenecks):
            rows.bottleneck = BottleneckRows.of(bottlenecks, bn.activation, bn.down_weight.shape[3], self._device)
        if merged is not None and not all(is_merged):  # a batch of only the merged adapter runs as the base does
            rows.merged_rows = torch.tensor(is_merged, device=self._device)[:, None, None]
        self.rows = rows

    # -- LoRA --------------------------------------------------------------------------------------------

    def _lora_rows(self, residents: list[Resident | None]) -> dict[str, LoraRows]:
        """Each layer's LoRA rows; layers that the same adapters of the batch write share one."""
        writers: dict[str, list[Resident]] = {}
        for resident in dict.fromkeys(r for r in residents if r is not None and r.pages):
            for layer in resident.adapter.layers:
                writers.setdefault(layer, []).append(resident)
        shared: dict[tuple[str, tuple[Resident, ...]], LoraRows] = {}
        rows: dict[str, LoraRows] = {}
        for layer, adapters in writers.items():
            pool = lora_pool(layer)
            key = pool, tuple(adapters)
            if key not in shared:
                shared[key] = LoraRows.of([r.pages[pool] if r in adapters else () for r in residents], self._device)
            rows[layer] = shared[key]
        return rows

    def _lora_chunks(self, residents: list[Resident | None], chunks: list[slice]
                     ) -> dict[str, list[tuple[slice, slice | torch.Tensor]]]:
        """By layer, the chunks whose LoRA writes it: (their rows, that LoRA's pages there)."""
        by_layer: dict[str, list[tuple[slice, slice | torch.Tensor]]] = {}
        for chunk in chunks:
            resident = residents[chunk.start]
            if resident is None or not resident.pages:
                continue
            pages = {pool: _as_slice(numbers, self._device) for pool, numbers in resident.pages.items()}
            for layer in resident.adapter.layers:
                by_layer.setdefault(layer, []).append((chunk, pages[lora_pool(layer)]))
        return by_layer

    def _store_lora(self, pages: dict[str, tuple[int, ...]], adapter: LoraAdapter) -> None:
        modules = dict(self.model.named_modules())
        for name in adapter.layers.keys() - self._lora_modules.keys():
            self._wrap_linear(name, modules[name])
        # Layers this adapter leaves alone keep its pages zero, as every free page is: `_clear_lora` zeroes
        # what an adapter wrote when it leaves, so no earlier tenant's weights remain.
        for name, weights in adapter.layers.items():
            self._lora_modules[name].store(pages[lora_pool(name)], self._cast(weights.a, f"{name}.lora_A"),
                                           self._cast(weights.b, f"{name}.lora_B", scale=weights.scale))

    def _clear_lora(self, resident: Resident) -> None:
        """Zero the pages in every layer the adapter may have written, and give them back."""
        for name in resident.adapter.layers:
            if name in self._lora_modules:
                self._lora_modules[name].clear(resident.pages[lora_pool(name)])
        for pool, pages in resident.pages.items():
            self._page_pools[pool].free += pages

    def _wrap_linear(self, name: str, linear: nn.Module) -> BatchedLoraLinear:
        parent_name, _, child = name.rpartition(".")
        wrapper = BatchedLoraLinear(name, linear, self)
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
        # A slot narrower than the widest adds zero columns: act(0 + 0) = 0 for every activation offered.
        bn.down_weight = _grow(bn.down_weight, (layers, 2, slots, r, hidden), like, dim=2)
        bn.down_bias = _grow(bn.down_bias, (layers, 2, slots, r), like, dim=2)
        bn.up_weight = _grow(bn.up_weight, (layers, 2, slots, r, hidden), like, dim=2)
        bn.up_bias = _grow(bn.up_bias, (layers, 2, slots, hidden), like, dim=2)
        for stack in (bn.down_weight, bn.down_bias, bn.up_weight, bn.up_bias):
            stack[:, :, slot].zero_()
        bn.down_weight[:, :, slot, :r] = self._cast(adapter.down_weight, "down.weight")
        bn.down_bias[:, :, slot, :r] = self._cast(adapter.down_bias, "down.bias")
        bn.up_weight[:, :, slot, :r] = self._cast(adapter.up_weight.transpose(-1, -2), "up.weight", scale=c.scaling)
        bn.up_bias[:, :, slot] = self._cast(adapter.up_bias, "up.bias", scale=c.scaling)
        bn.activation[slot] = c.non_linearity

    def _hook_bottlenecks(self, adapter: BottleneckAdapter) -> None:
        for layer in range(adapter.config.num_layers):
            for p, position in enumerate(POSITIONS):
                module = self.model.get_submodule(adapter.module_name(layer, position))
                module.register_forward_hook(self._bottleneck_hook(layer, p))

    def _bottleneck_hook(self, layer: int, p: int):
        def hook(_module, _inputs, output):
            if self.rows.bottleneck is None:
                return output
            return with_delta(output, lambda h: self._with_bottlenecks(h, layer, p))
        return hook

    def _with_bottlenecks(self, h: torch.Tensor, layer: int, p: int) -> torch.Tensor:
        """h (batch, tokens, hidden) + each row's scaling * up(act(down(h))); h alone for rows without one."""
        rows, bn = self.rows.bottleneck, self._bottlenecks
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
