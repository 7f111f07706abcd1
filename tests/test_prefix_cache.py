"""The torch engine's prefix cache and chunked prefill: a prompt prefix that a request of the same adapter
version computed before is read from cached blocks, never another adapter's or an older version's; a long
prompt is prefilled in chunks that ride in (or take turns with) the running streams' decode steps; answers
and prompt logprobs are those of a cold cache and of one whole prefill."""

import asyncio
import json
import time

import httpx
import pytest

from adapter_factory import KINDS
from conftest import CHAT, MODEL, scrape, serving_app
from test_kv_cache import _together

BUDGET = 256  # tokens a prefill step feeds: the server's --max-num-batched-tokens
# A system prompt of about 1,000 tokens, as a deployment's instructions are.
SYSTEM = "You are the assistant of the city library. " + " ".join(
    f"Rule {i}: books from shelf {i} may be borrowed for {i % 5 + 1} weeks and renewed {i % 3} times."
    for i in range(40))
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Say hello.", "What is 2 + 2?",
             "Write a haiku about rain.", "Name a fruit.", "What colour is the sky?", "Count to five.",
             "Name a planet.", "What is water made of?", "Name an animal.", "Say goodbye.",
             "What day comes after Monday?", "Name a vegetable.", "What is 3 + 5?", "Name a country."]


def _body(model: str, question: str, system: str = SYSTEM, **sampling) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": model, "messages": messages, "temperature": 0, "max_tokens": 8, **sampling}


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _hits(http: httpx.Client) -> tuple[float, float]:
    metrics = scrape(http)
    return (metrics.get(("swapyard_prefix_cache_hits_total", ()), 0),
            metrics.get(("swapyard_prefix_cache_queries_total", ()), 0))


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapter_root, adapter_dirs):
    with serving_app(data_dir=tmp_path_factory.mktemp("data"), adapter_roots=[adapter_root],
                     max_model_len=4096, max_num_batched_tokens=BUDGET) as (url, app):
        with httpx.Client(base_url=url, timeout=300) as http:
            for kind in KINDS:
                response = http.post("/v1/adapters", json={"name": f"pc-{kind}", "path": str(adapter_dirs[kind])})
                assert response.status_code == 201, response.text
            yield http, app


def _cold(app, http: httpx.Client, bodies: list[dict]) -> list[str]:
    """Each body's answer alone with the prefix cache off: every token computed."""
    scheduler = app.state.engine._scheduler
    scheduler.enable_prefix_caching = False
    try:
        return [_text(http.post(CHAT, json=body)) for body in bodies]
    finally:
        scheduler.enable_prefix_caching = True


def test_a_shared_system_prompt_is_prefilled_once(served):
    """Sixteen requests with one 1,000-token system prompt: after the first, each reads the prompt's blocks
    from the cache and computes only its own question, and answers as with a cold cache."""
    http, app = served
    bodies = [_body(MODEL, q) for q in QUESTIONS]
    cold = _cold(app, http, bodies)
    hits, queries = _hits(http)
    first = http.post(CHAT, json=bodies[0])
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 900 and _text(first) == cold[0]
    assert _hits(http)[0] == hits  # the first computes it all
    hits, queries = _hits(http)
    rest = asyncio.run(_together(str(http.base_url), bodies[1:]))
    assert [_text(r) for r in rest] == cold[1:]
    new_hits, new_queries = _hits(http)
    assert new_queries - queries >= 15 * prompt_tokens - 15 * 16  # questions differ by a few tokens
    assert new_hits - hits >= 15 * (prompt_tokens - 64)  # all but the blocks that hold each question


def test_adapters_never_read_each_others_blocks(served, adapter_dirs):
    """Every kind with the same text as the base: its first request finds nothing cached (the base's blocks
    are not its own), its second reads its own, and both answer as with a cold cache. A new version of an
    adapter under the same name does not read the old version's blocks."""
    http, app = served
    http.post(CHAT, json=_body(MODEL, QUESTIONS[0]))  # the base's blocks of this text are cached
    for kind in KINDS:
        bodies = [_body(f"pc-{kind}", q) for q in QUESTIONS[:2]]
        cold = _cold(app, http, bodies)
        hits = _hits(http)[0]
        assert _text(http.post(CHAT, json=bodies[0])) == cold[0]
        assert _hits(http)[0] == hits, kind
        assert _text(http.post(CHAT, json=bodies[1])) == cold[1]
        assert _hits(http)[0] > hits, kind
    assert http.post("/v1/adapters", json={"name": "pc-lora", "path": str(adapter_dirs["lora2"]),
                                           "replace": True}).status_code == 201
    hits = _hits(http)[0]
    http.post(CHAT, json=_body("pc-lora", QUESTIONS[0]))
    assert _hits(http)[0] == hits


def test_requests_share_cached_blocks_only_with_their_cache_salt(served):
    """A salted request (vLLM's `cache_salt`) finds nothing that unsalted requests or other salts cached."""
    http, _ = served
    http.post(CHAT, json=_body(MODEL, QUESTIONS[5]))
    for salt, found in (("tenant-a", False), ("tenant-a", True), ("tenant-b", False)):
        hits = _hits(http)[0]
        assert _text(http.post(CHAT, json=_body(MODEL, QUESTIONS[6], cache_salt=salt)))
        assert (_hits(http)[0] > hits) is found, salt


def test_a_merge_leaves_the_blocks_of_the_weights_before_it(served):
    """While a LoRA is merged every row runs on other weights: nothing cached before the merge is read,
    and after the unmerge neither is what was cached while it was merged."""
    http, _ = served
    body = _body(MODEL, QUESTIONS[3])
    http.post(CHAT, json=body)
    for action in ("merge", "unmerge"):
        assert http.post(f"/v1/adapters/pc-lora/{action}").status_code == 200
        hits = _hits(http)[0]
        http.post(CHAT, json=body)
        assert _hits(http)[0] == hits, action
        http.post(CHAT, json=_body("pc-lora", QUESTIONS[3]))
        assert _hits(http)[0] == hits, action


async def _stream(client: httpx.AsyncClient, body: dict, times: list[float]) -> str:
    """A streamed chat completion's text; the arrival time of each content chunk goes to `times`."""
    text = ""
    async with client.stream("POST", CHAT, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    times.append(time.monotonic())
                    text += delta
    return text


def test_a_long_prompt_is_prefilled_in_chunks_while_streams_decode(served):
    """A 2,000-token prompt arrives while four streams decode: it is prefilled in chunks of the step
    budget (in the streams' decode steps where the runner mixes them), and the streams get tokens between
    the chunks instead of waiting for the whole prefill. Its answer is the one it gets from a single
    prefill, and the one it gets alone."""
    http, app = served
    scheduler = app.state.engine._scheduler
    long_body = _body(MODEL, QUESTIONS[0], system=f"{SYSTEM} {SYSTEM}")
    scheduler.max_num_batched_tokens = 4096
    try:
        whole = _cold(app, http, [long_body])[0]
    finally:
        scheduler.max_num_batched_tokens = BUDGET
    assert _cold(app, http, [long_body]) == [whole]
    long_body = _body(MODEL, QUESTIONS[0], system=f"Branch {time.time_ns()}. {SYSTEM} {SYSTEM}")  # not cached

    async def run() -> tuple[list[list[float]], float, float, str]:
        stream_times: list[list[float]] = [[] for _ in range(4)]
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=300) as client:
            streams = [asyncio.create_task(_stream(client, _body(MODEL, q, system="Be brief.", max_tokens=96,
                                                                 ignore_eos=True), times))
                       for q, times in zip(QUESTIONS, stream_times)]
            while not all(stream_times):
                await asyncio.sleep(0.01)
            sent, long_times = time.monotonic(), []
            long_text = await _stream(client, long_body, long_times)
            await asyncio.gather(*streams)
        return stream_times, sent, long_times[0], long_text

    phase = "mixed" if scheduler.runner.mixed_steps else "prefill"  # the chunks ride in decode steps, or take turns
    chunks = scrape(http).get(("swapyard_engine_batch_size_count", (("phase", phase),)), 0)
    stream_times, sent, first_token, long_text = asyncio.run(run())
    prompt_tokens = http.post(CHAT, json={**long_body, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 1800
    chunks = scrape(http)[("swapyard_engine_batch_size_count", (("phase", phase),))] - chunks
    assert chunks >= prompt_tokens // BUDGET
    # One whole prefill would leave the streams a token or two in this window; chunks let them decode.
    during = [sum(sent < t < first_token for t in times) for times in stream_times]
    assert min(during) >= prompt_tokens // BUDGET // 2, during
    assert long_text == _cold(app, http, [long_body])[0]  # fed beside the streams as fed alone


def test_prompt_logprobs_of_a_chunked_prefill_are_those_of_one_pass(served):
    """Scoring a prompt (echo, max_tokens 0) gathers every chunk's logits; they match a single pass's."""
    http, app = served
    body = {"model": MODEL, "prompt": SYSTEM, "echo": True, "logprobs": 2, "max_tokens": 0}
    chunked = http.post("/v1/completions", json=body).json()
    scheduler = app.state.engine._scheduler
    scheduler.max_num_batched_tokens = 4096
    try:
        whole = http.post("/v1/completions", json=body).json()
    finally:
        scheduler.max_num_batched_tokens = BUDGET
    assert chunked["usage"]["prompt_tokens"] > 2 * BUDGET
    ours, theirs = chunked["choices"][0]["logprobs"], whole["choices"][0]["logprobs"]
    assert ours["tokens"] == theirs["tokens"] and len(ours["tokens"]) == chunked["usage"]["prompt_tokens"]
    assert ours["token_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(ours["token_logprobs"][1:], theirs["token_logprobs"][1:])) < 1e-3
    for a, b in zip(ours["top_logprobs"][1:], theirs["top_logprobs"][1:]):
        assert a.keys() == b.keys()
