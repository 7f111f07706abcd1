"""Prefix adapters in vLLM's paged KV cache, on a vLLM server with a small cache (--vllm-kv-cache-memory-gb):
K/V loaded into blocks the prompt shares, found again in vLLM's prefix cache, never across versions, freed
on delete, and loaded again after a preemption. Also the opt-in fallback: --torch-beside-vllm.

Each vLLM server is its own `swapyard serve` process (see test_vllm_engine.py). Marked slow.
"""

import asyncio
import json
import re

import httpx
import pytest
import torch

from adapter_factory import make_peft_adapter
from conftest import MODEL, MODEL_PATH, ask, start_serve_process

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
# About 1,400 tokens of float32 K/V for SmolLM2-135M: one 1,024-token context fits, a burst does not.
SMALL_KV_GB = "0.06"


def _serve(tmp, adapter_root, *extra: str):
    return start_serve_process(tmp / "serve.log", "--engine", "vllm", "--dtype", "float32", "--max-model-len", "1024",
                               "--vllm-kv-cache-memory-gb", SMALL_KV_GB, "--data-dir", str(tmp / "data"),
                               "--adapter-roots", json.dumps([str(adapter_root)]),
                               *extra, timeout=400)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory, adapter_root):
    proc, url = _serve(tmp_path_factory.mktemp("vllm-small"), adapter_root)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def prefixes(adapter_root) -> dict[str, object]:
    """150-token prefixes (more than one of vLLM's CPU blocks, and not a multiple of their size: full blocks
    of placeholders get cached) and a 6-token one."""
    out = {}
    for name, seed, virtual in (("long", 4, 150), ("first", 5, 150), ("second", 6, 150), ("short", 7, 6)):
        folder = adapter_root / f"kv-prefix-{name}"
        if not folder.exists():
            make_peft_adapter("prefix", MODEL_PATH, folder, seed=seed, num_virtual_tokens=virtual)
        out[name] = folder
    return out


def _register(clients, name: str, folder) -> None:
    for client in clients:
        registered = client.post("/v1/adapters", json={"name": name, "path": str(folder), "replace": True})
        assert registered.status_code == 201, registered.text


def _body(model: str, max_tokens: int = 24, question: str = QUESTION) -> dict:
    return {"model": model, "messages": ask(question), "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}


def _answer(client: httpx.Client, model: str, max_tokens: int = 24, question: str = QUESTION) -> str:
    response = client.post("/v1/chat/completions", json=_body(model, max_tokens, question))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _metric(client: httpx.Client, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r"(?:\{[^}]*\})? (\S+)"
    return sum(float(v) for v in re.findall(rf"^{pattern}$", client.get("/metrics").text, re.MULTILINE))


def test_a_prefix_longer_than_a_block_is_found_again_in_the_prefix_cache(vllm, http, prefixes):
    _register((vllm, http), "kv-long", prefixes["long"])
    expected = _answer(http, "kv-long")
    assert expected != _answer(http, MODEL)
    hits = _metric(vllm, "vllm:prefix_cache_hits_total")
    assert _answer(vllm, "kv-long") == expected
    assert _answer(vllm, "kv-long", question="Name a large city in France.") == _answer(
        http, "kv-long", question="Name a large city in France.")
    # The second request found the prefix's full block(s) cached and loaded only the rest.
    assert _metric(vllm, "vllm:prefix_cache_hits_total") >= hits + 128


def test_a_replaced_prefix_never_serves_its_old_kv(vllm, http, prefixes):
    """The new version's placeholder tokens are the old one's: only the salt per version keeps its requests
    off the old version's cached blocks."""
    _register((vllm, http), "kv-swap", prefixes["first"])
    first = _answer(vllm, "kv-swap")
    assert _answer(vllm, "kv-swap") == first == _answer(http, "kv-swap")
    _register((vllm, http), "kv-swap", prefixes["second"])
    second = _answer(vllm, "kv-swap")
    assert second == _answer(http, "kv-swap") and second != first


def test_delete_frees_the_workers_memory(vllm, prefixes, adapter_dirs):
    """A 150-token prefix holds 150 x 30 layers x 2 (K, V) x 3 heads x 64 x 4 bytes in the worker."""
    for kind, folder, size in (("prefix", prefixes["long"], 150 * 30 * 2 * 3 * 64 * 4),
                               ("bottleneck", adapter_dirs["bottleneck"], None)):
        before = _metric(vllm, "swapyard_vllm_worker_adapter_bytes", f'kind="{kind}"')
        _register((vllm,), f"kv-freed-{kind}", folder)
        held = _metric(vllm, "swapyard_vllm_worker_adapter_bytes", f'kind="{kind}"') - before
        assert held == size if size else held > 0
        assert vllm.delete(f"/v1/adapters/kv-freed-{kind}").status_code == 200
        assert _metric(vllm, "swapyard_vllm_worker_adapter_bytes", f'kind="{kind}"') == before


def test_preempted_prefix_and_bottleneck_requests_are_recomputed_exactly(vllm, prefixes, adapter_dirs):
    """A burst over the small cache makes vLLM preempt running requests; a preempted prefix request gets
    its K/V loaded again when it resumes, and every answer equals the request's answer alone."""
    max_tokens = 96
    _register((vllm,), "pre-long", prefixes["long"])
    _register((vllm,), "pre-short", prefixes["short"])
    _register((vllm,), "pre-bottleneck", adapter_dirs["bottleneck"])
    models = [MODEL, "pre-long", "pre-short", "pre-bottleneck"] * 3
    # 96 tokens take every request past a 128-token block: 27 blocks at the end, against the cache's 10.
    alone = {model: _answer(vllm, model, max_tokens=max_tokens) for model in set(models)}
    preemptions = _metric(vllm, "vllm:num_preemptions_total")

    async def burst() -> list[str]:
        async with httpx.AsyncClient(base_url=str(vllm.base_url), timeout=600) as client:
            responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=_body(m, max_tokens))
                                               for m in models))
        return [r.json()["choices"][0]["message"]["content"] for r in responses]

    answers = asyncio.run(burst())
    assert _metric(vllm, "vllm:num_preemptions_total") > preemptions
    assert [(m, a) for m, a in zip(models, answers) if a != alone[m]] == []


def test_torch_beside_vllm_serves_prefix_and_bottleneck_on_a_torch_engine(tmp_path, adapter_root, adapter_dirs, http):
    """The opt-in fallback: prefix and bottleneck adapters go to a torch engine started beside vLLM."""
    proc, url = _serve(tmp_path, adapter_root, "--torch-beside-vllm")
    try:
        with httpx.Client(base_url=url, timeout=300) as beside:
            for kind, engine in (("prefix", "torch"), ("bottleneck", "torch"), ("lora", "vllm")):
                _register((beside, http), f"beside-{kind}", adapter_dirs[kind])
                assert beside.get(f"/v1/adapters/beside-{kind}").json()["engine"] == engine
                assert _answer(beside, f"beside-{kind}") == _answer(http, f"beside-{kind}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_each_tensor_parallel_rank_keeps_the_heads_its_cache_holds(monkeypatch, ranks):
    """vLLM splits 4 KV heads over 2 or 4 ranks and replicates them over 8 (ranks 0-1 hold head 0, ...)."""
    from server.engine.vllm import prefix as vllm_prefix

    kv = torch.arange(4.0).view(1, 4, 1, 1).expand(2, 4, 3, 2)  # (layers, heads, virtual, head_dim): head index
    monkeypatch.setattr(vllm_prefix, "get_tensor_model_parallel_world_size", lambda: ranks)
    held = []
    for rank in range(ranks):
        monkeypatch.setattr(vllm_prefix, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        held.append(vllm_prefix._this_ranks_heads(kv)[0, :, 0, 0].tolist())
    per_rank = max(1, 4 // ranks)
    assert held == [[float(h) for h in range(r * 4 // ranks, r * 4 // ranks + per_rank)] for r in range(ranks)]
