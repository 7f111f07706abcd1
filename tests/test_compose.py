"""Composing registered LoRAs into a new one over the API (`POST /v1/adapters` with `compose`): the served
adapter answers as PEFT's add_weighted_adapter composes the same versions and PEFT serves it, its version records
where it came from, and an incompatible set is refused naming the adapter."""

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_factory import make_adapter
from conftest import CHAT, MODEL_PATH, ask

QUESTION = ask("Write a short poem about the sea.")
NUM_TOKENS = 12
LOGPROB_ATOL = 1e-3  # float32 on both sides, different batch shapes
WEIGHTS = (0.7, 0.3)
METHODS = [("ties", 0.5), ("linear", None)]


@pytest.fixture(scope="module")
def sources(base_url, adapter_dirs, adapter_root):
    """Two LoRAs of one rank, registered as mix-a and mix-b: their folders."""
    second = make_adapter("lora", MODEL_PATH, adapter_root / "compose-second", seed=2)  # rank 4, as adapter_dirs'
    folders = {"mix-a": adapter_dirs["lora"], "mix-b": second}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for name, folder in folders.items():
            assert http.post("/v1/adapters", json={"name": name, "path": str(folder)}).status_code == 201
    return folders


@pytest.fixture(scope="module")
def peft_reference(sources):
    """PEFT composing the same LoRAs by each method, on a float32 base: {method: the PEFT model serving it}."""
    model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(model, sources["mix-a"], adapter_name="mix-a")
    peft.load_adapter(sources["mix-b"], adapter_name="mix-b")
    for method, density in METHODS:
        peft.add_weighted_adapter(["mix-a", "mix-b"], list(WEIGHTS), method, combination_type=method, density=density)
    return peft


@pytest.mark.parametrize("method, density", METHODS)
def test_a_composed_lora_answers_as_peft_composes_it(http, sources, peft_reference, method, density):
    body = {"name": f"mix-{method}", "compose": {"method": method, "density": density, "adapters": [
        {"model": "mix-a", "weight": WEIGHTS[0]}, {"model": "mix-b@1", "weight": WEIGHTS[1]}]}}
    card = http.post("/v1/adapters", json=body)
    assert card.status_code == 201, card.text
    assert card.json()["kind"] == "lora"
    version = http.get(f"/v1/adapters/mix-{method}/versions").json()["data"][0]
    assert version["source"] == f"compose:{method}" and version["provenance"]["method"] == method
    assert [(a["adapter"], a["version"], a["weight"]) for a in version["provenance"]["adapters"]] == [
        ("mix-a", 1, WEIGHTS[0]), ("mix-b", 1, WEIGHTS[1])]
    reply = http.post(CHAT, json={"model": f"mix-{method}", "messages": QUESTION, "temperature": 0,
                                  "max_tokens": NUM_TOKENS, "ignore_eos": True, "logprobs": True}).json()
    served = [(t["token"], t["logprob"]) for t in reply["choices"][0]["logprobs"]["content"]]

    tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
    ids = torch.tensor([tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)])
    peft_reference.set_adapter(method)
    with torch.no_grad():
        tokens = peft_reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS)[0, ids.shape[1]:]
        logprobs = torch.log_softmax(peft_reference(input_ids=torch.cat([ids[0], tokens])[None]).logits[0], -1)
    expected = logprobs[ids.shape[1] - 1: -1].gather(1, tokens[:, None])[:, 0]
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert torch.allclose(torch.tensor([lp for _, lp in served]), expected, atol=LOGPROB_ATOL)


@pytest.mark.parametrize("compose, status, param", [
    ({"method": "ties", "density": 0.5, "adapters": [{"model": "mix-a"}, {"model": "mix-rank8"}]}, 400,
     "compose.adapters[1].model"),  # ranks differ: TIES adds them rank by rank
    ({"method": "linear", "adapters": [{"model": "mix-a"}, {"model": "mix-prompt"}]}, 400, "compose.adapters[1].model"),
    ({"method": "linear", "adapters": [{"model": "nobody"}, {"model": "mix-a"}]}, 404, "compose.adapters[0].model"),
    ({"method": "linear", "adapters": [{"model": "mix-a"}, {"model": "mix-a@9"}]}, 404, "compose.adapters[1].model"),
    ({"method": "ties", "adapters": [{"model": "mix-a"}, {"model": "mix-b"}]}, 400, "compose.density"),
    ({"method": "linear", "density": 0.5, "adapters": [{"model": "mix-a"}, {"model": "mix-b"}]}, 400,
     "compose.density"),
    ({"method": "average", "adapters": [{"model": "mix-a"}, {"model": "mix-b"}]}, 400, "compose.method"),
    ({"method": "linear", "adapters": [{"model": "mix-a"}]}, 400, "compose.adapters"),
    ({"method": "linear", "adapters": [{"model": "mix-a", "weight": 0}, {"model": "mix-b"}]}, 400,
     "compose.adapters.0.weight"),
    ({"method": "linear", "adapters": [{"model": "mix-a", "weight": 11}, {"model": "mix-b"}]}, 400,
     "compose.adapters.0.weight"),
])
def test_an_incompatible_composition_is_refused_naming_the_adapter(http, sources, adapter_dirs, compose, status,
                                                                      param):
    for name, kind in (("mix-rank8", "lora2"), ("mix-prompt", "prompt")):
        if http.get(f"/v1/adapters/{name}").status_code == 404:
            assert http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind])}).status_code == 201
    refused = http.post("/v1/adapters", json={"name": "mix-bad", "compose": compose})
    assert refused.status_code == status and refused.json()["error"]["param"] == param, refused.text
    assert http.get("/v1/adapters/mix-bad").status_code == 404
    both = http.post("/v1/adapters", json={"name": "mix-bad", "path": str(sources["mix-a"]), "compose": compose})
    assert both.status_code == 400 and both.json()["error"]["param"] in ("compose", param)
