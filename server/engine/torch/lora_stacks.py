"""LoRA weights in the torch engine: paged stacks per module and the kernels that run a batch's rows
through them, each row its own LoRA's pages.

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
Zeroing selects (masked_fill), never multiplies, so another adapter's overflow (inf * 0 = NaN) cannot reach
a row; freed pages are zeroed.
"""

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.torch.packed_linear import ROW_TILE, PackedLinear, in_row_tiles, with_weight

if TYPE_CHECKING:
    from server.engine.torch.kinds.lora import LoraKind


def grow(stack: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, dim: int = 0) -> torch.Tensor:
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
class PagePool:
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


def as_slice(indices: list[int] | tuple[int, ...], device: torch.device | str) -> slice | torch.Tensor:
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
            self._segments = [(as_slice(rows, device), as_slice(pages, device))
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
class LoraBatch:
    """The LoRA rows of the forward pass in flight."""

    layers: dict[str, LoraRows] = field(default_factory=dict)  # by layer; none for a layer no row's LoRA has
    merged_rows: torch.Tensor | None = None  # (batch, 1, 1): True for the merged LoRA's own rows
    # A packed step's prefill chunks (rows after `layers`', one sequence each): by layer, each chunk's rows and
    # its LoRA's pages, run as segments. Through the masked range, each chunk's tokens would be rows of the
    # decode kernel: a served mixed step over 16 LoRAs cost 146 ms against a decode step's 90.
    chunks: dict[str, list[tuple[slice, slice | torch.Tensor]]] = field(default_factory=dict)
    split: int | None = None  # rows `layers` covers, when chunks follow them


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
                 pages: slice | torch.Tensor, tile: int | None = None) -> None:
    """y[row] += B A x[row] through `pages` only; with `tile`, in row tiles (--batch-invariant)."""
    a_pages, b_pages = a[pages].reshape(-1, a.shape[-1]), b[pages].reshape(-1, b.shape[-1])
    if tile is not None:
        delta = in_row_tiles(lambda rows: (rows @ a_pages.T) @ b_pages, x[row], tile)
        if isinstance(row, slice):
            y[row] += delta
        else:
            y.index_add_(0, row, delta)
        return
    shrunk = x[row] @ a_pages.T  # (its rows, tokens, its rank)
    if isinstance(row, slice):  # its rows in order: added in place
        y[row].view(-1, y.shape[-1]).addmm_(shrunk.view(-1, shrunk.shape[-1]), b_pages)
    else:
        y.index_add_(0, row, shrunk @ b_pages)


class BatchedLoraLinear(nn.Module):
    """y = base(x) + B[slot] A[slot] x with the slot chosen per row; scale is folded into B."""

    def __init__(self, name: str, base: nn.Linear, kind: "LoraKind"):
        super().__init__()
        self.name, self.base, self._kind = name, base, kind
        # A (pages, page rank, in) and B transposed (pages, page rank, out), so page ranges flatten to views;
        # a page's rows beyond its adapter's rank are zero.
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        # Where the kind keeps them (a CPU engine in a lower precision): float32 copies of both, for lora_sparse.
        self.a_float32: torch.Tensor | None = None
        self.b_float32: torch.Tensor | None = None
        # While a LoRA is merged here: the weight before the fold (kept aside, untouched; in a tuple, which
        # nn.Module does not register as a parameter of its own), and the fold's A (rank, in) and -B^T (rank, out).
        self._merged: tuple[nn.Parameter, torch.Tensor, torch.Tensor] | None = None
        # Under --batch-invariant, while a LoRA is merged: a copy of the base over W + BA, for its rows only.
        self._folded: nn.Linear | None = None
        self._tile = ROW_TILE if kind.bank.batch_invariant else None

    @property
    def folded_weight(self) -> torch.Tensor:
        return (self._folded or self.base).weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (batch, tokens, in)
        rows = self._kind.rows
        y = self._base_of_rows(x, rows.merged_rows)
        lora = rows.layers.get(self.name)
        if lora is not None and self._tile is not None:  # each LoRA over its own rows, in row tiles
            for row, pages in lora.segments():
                lora_segment(x, y, self.a, self.b, row, pages, self._tile)
        elif lora is not None:  # its rows' adapters all wrote here, so their pages are in the stacks
            head = slice(None, rows.split)  # views: every row, or those before a packed step's chunks
            kernel = lora.kernel(x.shape[1], x.dtype, x.device)
            is_float32 = kernel is lora_sparse and self.a_float32 is not None  # a reduced-precision CPU engine's
            a, b = (self.a_float32, self.b_float32) if is_float32 else (self.a, self.b)
            kernel(x[head], y[head], a, b, lora)
        for chunk, pages in rows.chunks.get(self.name, ()):
            lora_segment(x, y, self.a, self.b, chunk, pages, self._tile)
        if self._merged is not None and rows.merged_rows is not None:
            _, a, negated_b = self._merged
            shrunk = (x @ a.T).masked_fill_(rows.merged_rows, 0.0)  # (batch, tokens, rank)
            y.view(-1, y.shape[-1]).addmm_(shrunk.view(-1, shrunk.shape[-1]), negated_b)
        return y

    def _base_of_rows(self, x: torch.Tensor, merged_rows: torch.Tensor | None) -> torch.Tensor:
        """The base layer's output; under --batch-invariant with a LoRA merged, the merged LoRA's rows through
        the folded copy and every other row through the base as it is (merged_rows None: every row merged)."""
        if self._folded is None:
            return self.base(x)
        if merged_rows is None:
            return self._folded(x)
        if not merged_rows.any():
            return self.base(x)
        return torch.where(merged_rows, self._folded(x), self.base(x))

    def fold(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """W + B A (b already scaled), in a new tensor: a weight tied to another module (an LM head shares the
        input embeddings' matrix) stays as it is there. Other rows get -B A back through the compensation, or
        under --batch-invariant keep the base weights."""
        folded = nn.Parameter(torch.addmm(self.base.weight.detach(), b, a), requires_grad=False)
        if self._tile is not None:
            self._folded = with_weight(self.base, folded)
            return
        original = self.base.weight
        self.base.weight = folded
        self._merged = (original, a, -b.T.contiguous())
        self._base_changed()

    def unfold(self) -> None:
        self._folded = None
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
        self.a = grow(self.a, (max(pages) + 1, LORA_PAGE_RANK, self.base.in_features), self.base.weight)
        self.b = grow(self.b, (max(pages) + 1, LORA_PAGE_RANK, self.base.out_features), self.base.weight)
        padding = len(pages) * LORA_PAGE_RANK - a.shape[0]
        index = torch.tensor(pages, device=self.a.device)
        # One indexed copy per matrix, not one per page: a load runs on the engine thread, between steps.
        self.a[index] = F.pad(a, (0, 0, 0, padding)).view(len(pages), LORA_PAGE_RANK, -1)
        self.b[index] = F.pad(b.T, (0, 0, 0, padding)).view(len(pages), LORA_PAGE_RANK, -1)
        if self._kind.keeps_float32:  # the same values: rounded once, to the engine's precision
            like = self.a.new_empty(0, dtype=torch.float32)
            self.a_float32 = grow(self.a_float32, tuple(self.a.shape), like)
            self.b_float32 = grow(self.b_float32, tuple(self.b.shape), like)
            self.a_float32[index], self.b_float32[index] = self.a[index].float(), self.b[index].float()

    def clear(self, pages: tuple[int, ...]) -> None:
        for stack in (self.a, self.b, self.a_float32, self.b_float32):
            if stack is not None:
                # long even when empty: a load that failed before the stacks grew to its pages clears none
                stack[torch.tensor([page for page in pages if page < stack.shape[0]], dtype=torch.long,
                                   device=stack.device)] = 0.0

