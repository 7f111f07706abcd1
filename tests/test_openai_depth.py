"""What real OpenAI clients send beyond messages and temperature: logprobs (chat and completions, echo
scoring), n with seeds, batches of prompts, the penalties, logit_bias, min_p, stop_token_ids, min_tokens,
and the model's own sampling defaults. Checked through the official `openai` client on the real model,
against transformers, with every adapter kind in one batch."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_factory import KINDS
from conftest import CHAT, MODEL, MODEL_PATH, ask, in_one_step, serving_app
from server.engine.base import SamplingParams
from server.engine.torch.sampler import apply_logit_changes
from server.generation_defaults import read_sampling_defaults
from test_adapter_parity import reference_model

LOGPROB_ATOL = 1e-3
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_PATH)


def _reference(kind: str | None, folder):
    if kind is None:
        return AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=torch.float32).eval()
    return reference_model(kind, folder)


@torch.no_grad()
def _greedy_logprobs(model, prompt: list[int], num_new: int) -> tuple[list[int], torch.Tensor]:
    """The reference's own greedy tokens (through end-of-sequence too) and the log-softmax before each."""
    ids, rows = list(prompt), []
    for _ in range(num_new):
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        rows.append(logprobs)
        ids.append(int(logprobs.argmax()))
    return ids[len(prompt):], torch.stack(rows)


def test_chat_logprobs_equal_transformers_for_every_kind_in_one_batch(every_kind, adapter_dirs,
                                                                      tokenizer):
    http, app, _ = every_kind
    models = [MODEL, *KINDS]
    body = {"messages": ask(QUESTION), "temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 5}
    responses = in_one_step(http, app, [{"model": m, **body} for m in models])
    prompt = tokenizer.apply_chat_template(ask(QUESTION), add_generation_prompt=True, return_dict=False)
    for model, response in zip(models, responses):
        assert response.status_code == 200, response.text
        content = response.json()["choices"][0]["logprobs"]["content"]
        kind = None if model == MODEL else model
        ids, reference = _greedy_logprobs(_reference(kind, adapter_dirs.get(kind)), prompt, len(content))
        assert [e["token"] for e in content] == [tokenizer.decode([i]) for i in ids], model
        for step, entry in enumerate(content):
            assert entry["logprob"] == pytest.approx(float(reference[step, ids[step]]), abs=LOGPROB_ATOL)
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
                reference[step].topk(5).values.tolist(), abs=LOGPROB_ATOL), model
            assert entry["bytes"] == list(entry["token"].encode())


def test_streamed_logprobs_match_the_response(every_kind):
    _, _, client = every_kind
    kwargs = {"model": "lora", "messages": ask(QUESTION), "temperature": 0, "max_tokens": 6, "logprobs": True,
              "top_logprobs": 2}
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


def test_echo_scores_a_multiple_choice_question_like_transformers(every_kind, tokenizer):
    """lm-evaluation-harness's loglikelihood: the prompt scored by /v1/completions with echo, max_tokens 0."""
    _, _, client = every_kind
    context = "Question: What is the capital of France?\nAnswer:"
    options = [" Paris", " Berlin", " Madrid", " a banana"]
    scored = client.completions.create(model=MODEL, prompt=[context + o for o in options], echo=True, max_tokens=0,
                                       logprobs=1, temperature=0)
    num_context = len(tokenizer.encode(context, add_special_tokens=False))
    model = _reference(None, None)
    served_scores, reference_scores = [], []
    for option, choice in zip(options, sorted(scored.choices, key=lambda c: c.index)):
        ids = tokenizer.encode(context + option, add_special_tokens=False)
        assert choice.text == context + option and choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        reference = [float(logprobs[k - 1, ids[k]]) for k in range(1, len(ids))]
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(reference, abs=LOGPROB_ATOL)
        served_scores.append(sum(choice.logprobs.token_logprobs[num_context:]))
        reference_scores.append(sum(reference[num_context - 1:]))
    assert options[max(range(len(options)), key=served_scores.__getitem__)] == " Paris"
    assert served_scores == pytest.approx(reference_scores, abs=len(options) * LOGPROB_ATOL)
    assert scored.usage.completion_tokens == 0


def test_echo_with_generation_leads_with_the_prompt(every_kind):
    _, _, client = every_kind
    done = client.completions.create(model="prefix", prompt="The capital of France is", echo=True, max_tokens=3,
                                     logprobs=2, temperature=0).choices[0]
    assert done.text.startswith("The capital of France is") and len(done.text) > len("The capital of France is")
    assert done.logprobs.top_logprobs[0] is None and len(done.logprobs.top_logprobs[-1]) == 2
    streamed = client.completions.create(model="prefix", prompt="The capital of France is", echo=True, max_tokens=3,
                                         logprobs=2, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.text


def test_n_choices_with_a_seed_are_distinct_and_reproducible(every_kind):
    _, _, client = every_kind
    kwargs = {"model": "bottleneck", "messages": ask("Name a fruit."), "temperature": 1.0, "max_tokens": 12,
              "n": 4, "seed": 1234}
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.message.content for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens > 4 and first.usage.prompt_tokens == again.usage.prompt_tokens
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(4)] == texts


def test_a_batch_of_prompts_gets_prompt_major_choices(every_kind):
    _, _, client = every_kind
    prompts = ["The capital of France is", "The capital of Italy is"]
    done = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0)
    texts = [c.text for c in sorted(done.choices, key=lambda c: c.index)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in prompts]
    assert texts == [alone[0], alone[0], alone[1], alone[1]]


def test_sampling_controls_apply_per_row_in_one_batch(every_kind, tokenizer):
    """Rows with different controls share a step; each gets what it gets alone, and each control does
    what it says."""
    http, app, _ = every_kind
    plain = {"model": MODEL, "messages": ask(QUESTION), "temperature": 0, "max_tokens": 12}
    alone_plain = http.post(CHAT, json=plain).json()["choices"][0]["message"]["content"]
    first_token = tokenizer.encode(alone_plain)[0]
    paris = tokenizer.encode(" Paris")[0]
    variants = {
        "banned": {**plain, "logit_bias": {str(first_token): -100}},
        "forced": {**plain, "logit_bias": {str(paris): 100}, "max_tokens": 3},
        "stop_at_paris": {**plain, "stop_token_ids": [paris]},
        "repetition": {**plain, "model": "lora", "repetition_penalty": 1.5, "max_tokens": 24, "ignore_eos": True},
        "frequency": {**plain, "model": "prompt", "frequency_penalty": 2.0, "presence_penalty": 1.0,
                      "max_tokens": 24, "ignore_eos": True},
        "min_tokens": {**plain, "messages": ask("Reply with one word: yes or no?"), "min_tokens": 8,
                       "max_tokens": 10},
        "min_p": {**plain, "temperature": 1.0, "min_p": 1.0, "seed": 3},  # only the top token survives: greedy
    }
    alone = {name: http.post(CHAT, json=body).json() for name, body in variants.items()}
    together = in_one_step(http, app, [plain, *variants.values()])
    assert together[0].json()["choices"][0]["message"]["content"] == alone_plain
    for name, response in zip(variants, together[1:]):
        assert response.json()["choices"] == alone[name]["choices"], name
    text = {name: r["choices"][0]["message"]["content"] for name, r in alone.items()}
    assert tokenizer.encode(text["banned"])[0] != first_token
    assert text["forced"].startswith(" Paris Paris") or text["forced"].strip().startswith("Paris Paris")
    assert "Paris" in alone_plain and "Paris" not in text["stop_at_paris"]
    assert alone["stop_at_paris"]["choices"][0]["finish_reason"] == "stop"
    assert alone["min_tokens"]["usage"]["completion_tokens"] >= 8
    assert text["min_p"] == alone_plain
    for name in ("repetition", "frequency"):
        unpenalized = http.post(CHAT, json={**variants[name], "repetition_penalty": 1, "frequency_penalty": 0,
                                            "presence_penalty": 0}).json()["choices"][0]["message"]["content"]
        repeats = [len(ids) - len(set(ids)) for ids in (tokenizer.encode(text[name]), tokenizer.encode(unpenalized))]
        assert repeats[0] < repeats[1], (name, text[name], unpenalized)


def test_penalties_follow_vllms_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    params = SamplingParams(max_tokens=4, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                            logit_bias=((4, 1.5),), min_tokens=3)
    prompt, generated = [0], [1, 3, 3]  # 3 generated tokens: min_tokens is met, end tokens are free again
    changed = apply_logit_changes(logits, [params], [(prompt, generated)], end_token_ids={2})
    # repetition: seen ids 0, 1, 3 -> positive / 2, negative * 2; frequency/presence on generated 1 (x1), 3 (x2)
    expected = torch.tensor([[1.0, -2.0 - 0.5 - 0.25, 0.5, 1.5 - 1.0 - 0.25, 1.5]])
    torch.testing.assert_close(changed, expected)
    early = apply_logit_changes(logits, [params], [(prompt, generated[:1])], end_token_ids={2})
    assert early[0, 2] == -torch.inf  # before min_tokens the end token is barred
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]]))  # the engine's logits are not touched


def test_the_models_sampling_defaults_apply_when_a_request_omits_them(http):
    assert read_sampling_defaults(MODEL_PATH) == {"temperature": 0.2, "top_p": 0.9}

    def answer(**sampling) -> str:
        body = {"model": MODEL, "messages": ask("Write a short poem about the sea."), "max_tokens": 24, "seed": 5}
        return http.post(CHAT, json={**body, **sampling}).json()["choices"][0]["message"]["content"]

    assert answer() == answer(temperature=0.2, top_p=0.9)
    assert answer() != answer(temperature=1.0, top_p=1.0)


def test_generation_config_none_keeps_openais_defaults(tmp_path):
    with serving_app(data_dir=tmp_path, generation_config="none") as (_, app):
        assert app.state.router.sampling_defaults == {}
