"""The torch engine's paged KV cache: memory follows the tokens a sequence has, not the most it could
have; a full pool preempts the newest sequences and recomputes them later; and every request still gets
the answer it gets alone, for every adapter kind."""

import asyncio

import httpx
import pytest
import torch

from adapter_factory import KINDS
from conftest import CHAT, MODEL, ask, scrape, serving_app, steps_wider_than
from server.engine.torch.kv_cache import NULL_BLOCK, KVCacheFull, PagedKVCache, block_hashes

CONTEXT = 256  # the tight server's pool holds this many tokens: one whole context, its floor
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Say hello.", "What is 2 + 2?",
             "Write a haiku about rain.", "Name a fruit."]


def test_the_pool_grows_on_demand_up_to_its_budget_and_reuses_freed_blocks():
    block_bytes = 2 * 2 * 32 * 1 * 4 * 4  # K and V, 2 layers, 32 tokens, 1 head of 4 float32

    def cache(budget_bytes: int, max_model_len: int) -> PagedKVCache:
        return PagedKVCache(2, 1, 1, 4, budget_bytes=budget_bytes, max_model_len=max_model_len,
                            dtype=torch.float32, device=torch.device("cpu"))

    pool = cache(10 * block_bytes, 32)
    assert pool.max_blocks == 10 and pool.kv.shape[1] == 0 and pool.num_free == 10  # nothing until it is needed
    first = pool.allocate(3)
    assert pool.num_used == 3 and pool.kv.shape[1] < 11
    pool.kv[:, first] = float("nan")  # a failed sequence's values
    rest = pool.allocate(7)
    assert pool.num_free == 0 and pool.kv.shape[1] == 11 and NULL_BLOCK not in first + rest
    with pytest.raises(KVCacheFull):
        pool.allocate(1)
    pool.free(first, clear=True)
    assert sorted(pool.allocate(3)) == sorted(first) and pool.kv.isfinite().all()
    assert cache(1, 100).max_blocks == 4  # one whole context always fits


def test_cached_blocks_are_shared_by_reference_and_evicted_least_recent_first():
    pool = PagedKVCache(1, 1, 1, 4, budget_bytes=0, max_model_len=4 * 32, dtype=torch.float32,
                        device=torch.device("cpu"))
    tokens = list(range(3 * 32 + 5))
    hashes = block_hashes(b"base", tokens, 32, [])
    assert len(hashes) == 3 and block_hashes(b"base", tokens, 32, hashes[:1]) == hashes
    assert block_hashes(b"lora", tokens, 32, []) != hashes  # another root: nothing in common
    assert block_hashes(b"base", [7, *tokens[1:]], 32, []).count(hashes[2]) == 0  # a block hashes all before it
    first = pool.allocate(4)
    for block, digest in zip(first, hashes):
        pool.publish(block, digest)
    assert pool.lookup(hashes) == first[:3]
    pool.share(first[:2])  # a second sequence holds the first two
    pool.free(first)
    assert pool.num_cached == 1 and pool.num_used == 2  # the third is cached, the last free
    pool.free(first[:2])
    assert pool.num_cached == 3 and pool.num_free == 4
    pool.allocate(2)  # the free block, then the least recently freed cached one: the first sequence's third
    assert pool.lookup(hashes) == first[:2]
    pool.share(first[:2])
    pool.free(first[:2], clear=True)  # a failed sequence's blocks are never found again
    assert pool.lookup(hashes) == [] and pool.num_cached == 0


def _body(model: str, question: str, **sampling) -> dict:
    return {"model": model, "messages": ask(question), "temperature": 0, **sampling}


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


async def _together(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(client.post(CHAT, json=body) for body in bodies))


@pytest.fixture(scope="module")
def tight(tmp_path_factory, adapter_root, adapter_dirs):
    """A server whose KV budget is below its floor, so the pool holds one whole context and no more."""
    with serving_app(data_dir=tmp_path_factory.mktemp("data"), adapter_roots=[adapter_root],
                     max_model_len=CONTEXT, kv_cache_memory_gb=0.001, max_resident_adapters=8) as (url, app):
        with httpx.Client(base_url=url, timeout=300) as http:
            for kind in KINDS:
                response = http.post("/v1/adapters", json={"name": f"kv-{kind}", "path": str(adapter_dirs[kind])})
                assert response.status_code == 201, response.text
            yield http, app


def test_requests_without_max_tokens_share_a_pool_that_holds_one_context(tight):
    """Nothing is reserved for the tokens a request may generate: requests that omit `max_tokens` (OpenAI
    clients' default) run together in the space a slot cache gives one of them."""
    http, _ = tight
    bodies = [_body(MODEL, q) for q in QUESTIONS[:4]]
    alone = [_text(http.post(CHAT, json=body)) for body in bodies]
    wide_before = steps_wider_than(http, 2)
    together = asyncio.run(_together(str(http.base_url), bodies))
    assert steps_wider_than(http, 2) > wide_before  # three or more sequences in one step
    assert [_text(r) for r in together] == alone


def test_a_full_pool_preempts_the_newest_and_recomputes_them_with_the_same_answers(tight):
    """Every kind, greedy and seeded sampling, and a stop string: more work than the pool holds, sent at
    once. Preempted sequences give their blocks back and resume from their tokens; no token is lost,
    repeated or changed."""
    http, app = tight
    bodies = [_body(m, q, max_tokens=64, ignore_eos=True)
              for m, q in zip([MODEL, *(f"kv-{kind}" for kind in KINDS)], QUESTIONS)]
    bodies += [_body(MODEL, QUESTIONS[4], max_tokens=64, temperature=1.0, seed=7),
               _body("kv-lora", QUESTIONS[1], max_tokens=64, stop=[","])]
    alone = [_text(http.post(CHAT, json=body)) for body in bodies]
    preempted_before = scrape(http).get(("swapyard_engine_preemptions_total", ()), 0)
    together = asyncio.run(_together(str(http.base_url), bodies))
    metrics = scrape(http)
    assert metrics[("swapyard_engine_preemptions_total", ())] > preempted_before
    assert [_text(r) for r in together] == alone
    assert metrics[("swapyard_kv_cache_blocks", (("state", "used"),))] == 0  # every block came back
    cache = app.state.engine._scheduler.runner.cache
    assert cache.num_free == cache.max_blocks == CONTEXT // cache.block_size
