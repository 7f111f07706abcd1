"""One tenant never changes another tenant's result: hostile sampling parameters, adapters whose weights
go non-finite, freed slots, KV-cache growth that fails and an engine loop that fails all stay with the
requests they belong to. Requests are sent concurrently so that they share engine steps (checked on the
engine's batch-size histogram), and every innocent answer must equal the same request served alone."""

import asyncio
import time

import httpx
import pytest
import torch

from conftest import CHAT, MODEL, ask, in_one_step, scrape, serving_app, until_generating
from server.engine.torch.lora_stacks import lora_pool

QUESTIONS = [ask(q) for q in ("What is the capital of France?", "Name three colours.", "Say hello.",
                              "Write a haiku about rain.")]


def _body(model: str, messages: list[dict], **sampling) -> dict:
    return {"model": model, "messages": messages, "max_tokens": 24, "ignore_eos": True, "temperature": 0,
            **sampling}


async def _together(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post(CHAT, json=body) for body in bodies))


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapter_root):
    with serving_app(data_dir=tmp_path_factory.mktemp("data"), adapter_roots=[adapter_root],
                     max_resident_adapters=8) as (url, app):
        with httpx.Client(base_url=url, timeout=120) as http:
            yield http, app


@pytest.mark.parametrize("hostile", [
    {"temperature": 1e-300},  # divided logits overflow to inf: treated as greedy
    {"temperature": 1.0, "top_p": 1e-300},  # rounds to 0 in float32: would cut every token
    {"temperature": 5e-324, "top_p": 0.5, "top_k": 40, "seed": 2**63 - 1},  # the smallest float
    {"temperature": 1e-300, "stop": ["a" * 256, "\u2603" * 256, "ab" * 128, "x"]},
])
def test_hostile_sampling_never_changes_other_answers(served, hostile):
    http, app = served
    alone = [_text(http.post(CHAT, json=_body(MODEL, q))) for q in QUESTIONS]
    responses = in_one_step(http, app, [_body(MODEL, q) for q in QUESTIONS] + [_body(MODEL, QUESTIONS[0], **hostile)])
    assert [_text(r) for r in responses[:-1]] == alone
    assert responses[-1].status_code == 200, responses[-1].text  # the hostile one is answered too


def _resident(app, name: str):
    """The torch engine's resident version of `name` (its bank's pages and running count)."""
    return app.state.engine._residency.slots.get(name).handle


def _poison(app, name: str) -> None:
    """Make a resident LoRA's weights overflow, as a NaN/inf adapter or a float overflow would: the
    registration check refuses such files, so this writes into the engine's LoRA pages directly."""
    bank = app.state.engine._scheduler.runner.adapters
    pages = _resident(app, name).pages
    for wrapper in bank.kinds["lora"].modules.values():
        if (pool := lora_pool(wrapper.name)) in pages:
            for a, b in ((wrapper.a, wrapper.b), (wrapper.a_float32, wrapper.b_float32)):
                if a is not None:  # the float32 copies of a CPU engine in bf16 too
                    a[list(pages[pool])] = torch.finfo(a.dtype).max
                    b[list(pages[pool])] = 1.0


def test_an_overflowing_lora_fails_alone_and_leaves_nothing_behind(served, adapter_dirs):
    """LoRA slots 1..3 with the middle one poisoned: rows of the others (and base rows) batched with it
    keep their exact answers, its own rows fail, and the slot range it sat in is clean afterwards."""
    http, app = served
    names = ["iso-a", "iso-poisoned", "iso-c"]
    for name, kind in zip(names, ("lora", "lora2", "lora")):
        assert http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]),
                                               "replace": True}).status_code == 201
    innocent = [(MODEL, QUESTIONS[0]), ("iso-a", QUESTIONS[1]), ("iso-c", QUESTIONS[2]), (MODEL, QUESTIONS[3])]
    alone = [_text(http.post(CHAT, json=_body(m, q))) for m, q in innocent]
    _poison(app, "iso-poisoned")
    bodies = [_body(m, q) for m, q in innocent] + [_body("iso-poisoned", q) for q in QUESTIONS[:2]]
    responses = in_one_step(http, app, bodies)
    assert [_text(r) for r in responses[:4]] == alone
    for failed in responses[4:]:
        assert failed.status_code == 500 and "non-finite" in failed.json()["error"]["message"]
    # Deleted, its slot is zeroed; whatever ran in its KV-cache slots left nothing other rows can read.
    assert http.delete("/v1/adapters/iso-poisoned").status_code == 200
    responses = asyncio.run(_together(str(http.base_url), [_body(m, q) for m, q in innocent]))
    assert [_text(r) for r in responses] == alone


def test_a_freed_slot_between_used_ones_is_inert(served, adapter_dirs):
    """A deleted adapter's pages sit inside the page range of a batch of its neighbours."""
    http, app = served
    names = ["free-a", "free-gone", "free-c"]
    for name in names:
        assert http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs["lora"]),
                                               "replace": True}).status_code == 201
    pages = {name: _resident(app, name).pages for name in names}
    for pool in pages["free-gone"]:
        assert pages["free-a"][pool] < pages["free-gone"][pool] < pages["free-c"][pool]
    alone = [_text(http.post(CHAT, json=_body(name, q))) for name in ("free-a", "free-c") for q in QUESTIONS[:3]]
    _poison(app, "free-gone")
    assert http.delete("/v1/adapters/free-gone").status_code == 200
    responses = in_one_step(http, app, [_body(n, q) for n in ("free-a", "free-c") for q in QUESTIONS[:3]])
    assert [_text(r) for r in responses] == alone


def test_a_client_gone_from_the_last_stream_of_a_replaced_version_frees_its_pages(served, adapter_dirs):
    """A replaced LoRA keeps its pages while a stream of it runs; when that stream's client leaves, they go
    back, and the bank holds what the new version alone needs."""
    http, app = served
    bank = app.state.engine._scheduler.runner.adapters
    register = {"name": "gone-lora", "path": str(adapter_dirs["lora"]), "replace": True}
    assert http.post("/v1/adapters", json=register).status_code == 201
    assert _text(http.post(CHAT, json=_body("gone-lora", QUESTIONS[0])))  # resident
    loras = bank.kinds["lora"]
    one_version = loras.num_resident
    body = {**_body("gone-lora", QUESTIONS[1], max_tokens=400, ignore_eos=True), "stream": True}
    with http.stream("POST", CHAT, json=body) as stream:
        lines = stream.iter_lines()  # held: a dropped iterator closes the response (the client goes)
        until_generating(lines)
        assert http.post("/v1/adapters", json={**register, "path": str(adapter_dirs["lora2"])}).status_code == 201
        assert loras.num_resident == one_version + 1
    deadline = time.monotonic() + 20
    while loras.num_resident != one_version:
        assert time.monotonic() < deadline, loras.num_resident
        time.sleep(0.1)
    assert _text(http.post(CHAT, json=_body("gone-lora", QUESTIONS[0])))


def test_kv_cache_growth_failure_answers_every_request(served, adapter_dirs):
    """The cache's pool cannot grow (out of memory, injected): the requests it was for get an error,
    release their adapters, and the server goes on serving."""
    http, app = served
    assert http.post("/v1/adapters", json={"name": "grow-lora", "path": str(adapter_dirs["lora"]),
                                           "replace": True}).status_code == 201
    scheduler = app.state.engine._scheduler
    cache = scheduler.runner.cache
    calls = []

    def failing_allocate(count):
        calls.append(count)
        raise RuntimeError("injected: out of memory")

    cache.allocate = failing_allocate
    try:
        responses = asyncio.run(_together(str(http.base_url), [_body("grow-lora", q) for q in QUESTIONS]))
    finally:
        del cache.allocate
    assert calls
    for response in responses:
        assert response.status_code == 500 and "KV-cache memory" in response.json()["error"]["message"]
    assert _resident(app, "grow-lora").num_active == 0
    assert not scheduler.waiting and not scheduler.running
    assert "Paris" in _text(http.post(CHAT, json=_body(MODEL, QUESTIONS[0])))


def test_a_failing_engine_loop_restarts_then_stays_down_and_says_so(tmp_path):
    with serving_app(data_dir=tmp_path / "data") as (url, app):
        with httpx.Client(base_url=url, timeout=120) as http:
            core = app.state.engine._core
            real_step, failures = core.step, []

            def failing_step():
                failures.append(1)
                raise RuntimeError("injected engine failure")

            failures_before = scrape(http).get(("swapyard_engine_failures_total", ()), 0)
            core.step = failing_step
            failed = http.post(CHAT, json=_body(MODEL, QUESTIONS[0]))
            assert failed.status_code == 500 and "injected" in failed.json()["error"]["message"]
            core.step = real_step  # one failure: the loop restarted and serves again
            assert "Paris" in _text(http.post(CHAT, json=_body(MODEL, QUESTIONS[0])))
            assert http.get("/health").status_code == 200
            assert scrape(http)[("swapyard_engine_failures_total", ())] == failures_before + 1

            core.step = failing_step  # failures in a row: the engine stays down
            for _ in range(2):
                assert http.post(CHAT, json=_body(MODEL, QUESTIONS[0])).status_code == 500
            assert http.get("/health").status_code == 503 and http.get("/ready").status_code == 503
            down = http.post(CHAT, json=_body(MODEL, QUESTIONS[0]))
            assert down.status_code == 503 and down.json()["error"]["code"] == "engine_failed"
            assert len(failures) == 3
