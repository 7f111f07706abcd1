"""Merging a LoRA into the base: offline, `swapyard merge` writes a standalone model that plain
transformers loads and that answers as the served adapter does; online, POST /v1/adapters/{name}/merge
folds it into the live weights while the base and every other adapter keep their exact greedy answers,
a request running across the merge included. Other kinds are refused."""

import asyncio
import json
import subprocess
import sys

import httpx

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.lora import LoraAdapter, LoraWeights
from conftest import MODEL, MODEL_PATH, ask, scrape
from server.engine.torch.model_runner import ModelRunner
from test_adapter_parity import prefill

QUESTION = ask("Write a short poem about the sea.")


def test_merged_model_answers_like_the_served_lora(http, adapter_dirs, tmp_path):
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "server", "merge", str(adapter_dirs["lora"]), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    merged = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)

    assert http.post("/v1/adapters", json={"name": "to-merge", "path": str(adapter_dirs["lora"]),
                                           "replace": True}).status_code == 201
    served = http.post("/v1/chat/completions", json={"model": "to-merge", "messages": QUESTION, "temperature": 0,
                                                     "max_tokens": 16}).json()["choices"][0]["message"]["content"]
    assert merged == served


def test_merge_refuses_adapters_that_are_not_linear(adapter_dirs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "server", "merge", str(adapter_dirs["prefix"]), "--out",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode != 0
    assert "only LoRA adapters fold into the weights" in done.stderr
    assert not (tmp_path / "x").exists()


ONLINE = {"m-lora": "lora", "m-lora2": "lora2", "m-prompt": "prompt", "m-prefix": "prefix",
          "m-bottleneck": "bottleneck"}


async def _answers_together(base_url: str, models: list[str]) -> dict[str, str]:
    """Every model's greedy answer, all sent at once so that one batch mixes them."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        async def one(model: str) -> str:
            body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 24}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]
        return dict(zip(models, await asyncio.gather(*map(one, models))))


async def _stream_across(base_url: str, action: str) -> str:
    """A base stream with `action` (merge or unmerge m-lora) posted once its first tokens arrived."""
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 48, "stream": True}
    text, acted = [], False
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
                if len(text) == 3 and not acted:
                    assert (await client.post(f"/v1/adapters/m-lora/{action}")).status_code == 200
                    acted = True
    assert acted
    return "".join(text)


def _base_long(http) -> str:
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 48}
    return http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def test_online_merge_keeps_base_and_other_adapters_exact(http, base_url, adapter_dirs):
    for name, kind in ONLINE.items():
        response = http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]), "replace": True})
        assert response.status_code == 201, response.text
    models = [MODEL, *ONLINE]
    before = asyncio.run(_answers_together(base_url, models))
    assert len(set(before.values())) == len(models)  # every adapter changes the answer: the test can tell them apart
    base_long = _base_long(http)

    assert asyncio.run(_stream_across(base_url, "merge")) == base_long
    card = http.get("/v1/adapters/m-lora").json()
    assert card["merged"] is True
    assert scrape(http)[("swapyard_adapter_merged", (("model", "m-lora"),))] == 1
    assert asyncio.run(_answers_together(base_url, models)) == before

    # Merging another LoRA unmerges the first; every answer still holds.
    assert http.post("/v1/adapters/m-lora2/merge").json()["merged"] is True
    assert http.get("/v1/adapters/m-lora").json()["merged"] is False
    assert asyncio.run(_answers_together(base_url, models)) == before
    assert http.post("/v1/adapters/m-lora2/unmerge").status_code == 200

    http.post("/v1/adapters/m-lora/merge")
    assert asyncio.run(_stream_across(base_url, "unmerge")) == base_long
    assert http.get("/v1/adapters/m-lora").json()["merged"] is False
    assert asyncio.run(_answers_together(base_url, models)) == before


def test_replacing_or_deleting_the_merged_lora_unmerges_it(http, adapter_dirs):
    for name, kind in (("r-lora", "lora"), ("r-lora2", "lora2")):
        http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]), "replace": True})
    lora2 = asyncio.run(_answers_together(str(http.base_url), ["r-lora2"]))["r-lora2"]
    base = asyncio.run(_answers_together(str(http.base_url), [MODEL]))[MODEL]
    http.post("/v1/adapters/r-lora/merge")
    replaced = http.post("/v1/adapters", json={"name": "r-lora", "path": str(adapter_dirs["lora2"]),
                                               "replace": True})
    assert replaced.status_code == 201 and replaced.json()["merged"] is False
    assert asyncio.run(_answers_together(str(http.base_url), ["r-lora", MODEL])) == {"r-lora": lora2, MODEL: base}

    http.post("/v1/adapters/r-lora/merge")
    assert http.delete("/v1/adapters/r-lora").status_code == 200
    assert asyncio.run(_answers_together(str(http.base_url), [MODEL]))[MODEL] == base


def test_online_merge_errors(http, adapter_dirs):
    http.post("/v1/adapters", json={"name": "e-prefix", "path": str(adapter_dirs["prefix"]), "replace": True})
    http.post("/v1/adapters", json={"name": "e-lora", "path": str(adapter_dirs["lora"]), "replace": True})
    refused = http.post("/v1/adapters/e-prefix/merge")
    assert refused.status_code == 400 and "only LoRA adapters fold" in refused.json()["error"]["message"]
    assert http.post("/v1/adapters/nope/merge").status_code == 404
    not_merged = http.post("/v1/adapters/e-lora/unmerge")
    assert not_merged.status_code == 409 and not_merged.json()["error"]["code"] == "not_merged"


def test_merging_a_lora_on_the_tied_lm_head_leaves_the_input_embeddings_alone():
    """SmolLM2's LM head shares the input embeddings' matrix: a fold into it in place would change every row's
    embeddings, which the compensation (on the head's output only) does not take back."""
    runner = ModelRunner(MODEL_PATH, device="cpu", dtype="float32", max_model_len=256, kv_cache_bytes=2**30,
                         max_resident_adapters=4)
    head, embeddings = runner.model.get_output_embeddings(), runner.model.get_input_embeddings()
    assert head.weight is embeddings.weight
    gen = torch.Generator().manual_seed(0)
    vocab, hidden = head.weight.shape
    lora = LoraAdapter({"lm_head": LoraWeights(torch.randn(8, hidden, generator=gen) * 0.1,
                                               torch.randn(vocab, 8, generator=gen) * 0.1, 1.0)})
    residents = [None, runner.adapters.place("head", lora)]
    before = prefill(runner, residents, list(range(300, 320)))
    runner.adapters.merge(residents[1])
    merged = prefill(runner, residents, list(range(300, 320)))
    torch.testing.assert_close(merged, before, atol=1e-3, rtol=0)  # the base row too: its embeddings unchanged
    runner.adapters.unmerge()
    assert runner.model.get_output_embeddings().base.weight is embeddings.weight  # tied again
    assert torch.equal(prefill(runner, residents, list(range(300, 320))), before)
