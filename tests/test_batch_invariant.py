"""`--batch-invariant` (issue 36): in bf16 a request's answer does not depend on what shares its steps. 20
greedy requests over the base model and every adapter kind, each alone, then all in one step, then in waves
that join while others decode (chunks beside decode rows), are byte-identical; merging a LoRA and unmerging it
changes no other model's answer."""

import asyncio

import httpx
import pytest
import torch

from adapter_factory import KINDS
from conftest import CHAT, MODEL, MODEL_PATH, ask, in_one_step, serving_app
from server.engine.base import check_exact_merge
from server.engine.factory import build_engine
from server.settings import EngineSettings

QUESTIONS = [ask(q) for q in ("What is the capital of France?", "Name three colours.", "Say hello.",
                              "Write a haiku about rain, the sea and the long grey afternoons of November.")]
MODELS = [MODEL, *KINDS]


def _body(model: str, messages: list[dict]) -> dict:
    return {"model": model, "messages": messages, "max_tokens": 24, "ignore_eos": True, "temperature": 0}


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def invariant(adapter_dirs, adapter_root, tmp_path_factory):
    with serving_app(data_dir=tmp_path_factory.mktemp("data"), adapter_roots=[adapter_root], dtype="bfloat16",
                     batch_invariant=True, max_resident_adapters=8) as (url, app):
        with httpx.Client(base_url=url, timeout=120) as http:
            for kind in KINDS:
                assert http.post("/v1/adapters", json={"name": kind, "path": str(adapter_dirs[kind])}
                                 ).status_code == 201
            yield http, app


async def _waves(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Each body a little after the one before: most join a step while others decode."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def later(i: int, body: dict) -> httpx.Response:
            await asyncio.sleep(0.07 * i)
            return await client.post(CHAT, json=body)
        return await asyncio.gather(*(later(i, body) for i, body in enumerate(bodies)))


def test_answers_do_not_depend_on_what_shares_the_step_in_bf16(invariant):
    http, app = invariant
    bodies = [_body(model, question) for model in MODELS for question in QUESTIONS]
    alone = [_text(http.post(CHAT, json=body)) for body in bodies]
    assert [_text(r) for r in in_one_step(http, app, bodies)] == alone
    assert [_text(r) for r in asyncio.run(_waves(str(http.base_url), bodies[::-1]))] == alone[::-1]
    mixed = bodies[1::3] + bodies[::2]
    assert [_text(r) for r in asyncio.run(_waves(str(http.base_url), mixed))] == alone[1::3] + alone[::2]


def test_merging_a_lora_changes_no_other_models_answers_in_bf16(invariant):
    http, app = invariant
    others = [_body(model, question) for model in MODELS if model != "lora" for question in QUESTIONS]
    before = [_text(http.post(CHAT, json=body)) for body in others]
    assert http.post("/v1/adapters/lora/merge").status_code == 200
    try:
        assert [_text(r) for r in in_one_step(http, app, others + [_body("lora", QUESTIONS[0])] * 2)][:-2] == before
    finally:
        assert http.post("/v1/adapters/lora/unmerge").status_code == 200
    assert [_text(http.post(CHAT, json=body)) for body in others] == before


def test_without_batch_invariance_a_bf16_merge_is_refused_unless_allowed(adapter_dirs, adapter_root, tmp_path):
    with serving_app(data_dir=tmp_path, adapter_roots=[adapter_root], dtype="bfloat16") as (url, _):
        with httpx.Client(base_url=url, timeout=120) as http:
            registered = http.post("/v1/adapters", json={"name": "lora", "path": str(adapter_dirs["lora"])})
            assert registered.status_code == 201
            refused = http.post("/v1/adapters/lora/merge")
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "merge_inexact"
            assert "--allow-inexact-merge" in refused.json()["error"]["message"]
            assert http.get("/v1/adapters/lora").json()["merged"] is False
    check_exact_merge(torch.bfloat16, batch_invariant=False, allowed=True)  # the operator's opt-in
    check_exact_merge(torch.float32, batch_invariant=False, allowed=False)


def test_the_vllm_engine_refuses_batch_invariance_at_start():
    with pytest.raises(SystemExit, match="--batch-invariant"):
        build_engine(EngineSettings(engine="vllm", batch_invariant=True), MODEL_PATH, None, 1024)
