"""Preference tuning (DPO) really teaches a preference the base does not have: answers signed off
"Yours in adapters, Quillon." (training/examples/signoff_*.jsonl, preferred over the same answers unsigned),
through OpenAI's fine-tuning API. The loss is DPO's, the preference data is checked line by line, and the knobs
are bounded."""

import csv
import io
import json
import math
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from conftest import MODEL, MODEL_PATH, ask
from training.config import TrainConfig
from training.data import IGNORE, DataError
from training.objectives import answer_logps, dpo_loss
from training.preferences import load_preferences
from training.recipe import train

EXAMPLES = Path(__file__).resolve().parents[1] / "training" / "examples"
SIGN_OFF = "Yours in adapters, Quillon."
HELD_OUT = ["What is the capital of Portugal?", "What colour is grass?", "What animal barks?"]
PREFERENCE = {"input": {"messages": [{"role": "user", "content": "Hi"}]},
              "preferred_output": [{"role": "assistant", "content": "Hello!"}],
              "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_PATH)


def _write(tmp_path, lines: list, name="prefs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_the_loss_is_dpos_on_the_answer_tokens_only():
    """Against a plain float64 computation, token by token: -log sigmoid(beta * (policy - reference log-ratios))."""
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11)  # rows 0-1 preferred, 2-3 non-preferred
    labels = torch.randint(0, 11, (4, 7))
    labels[:, :3] = IGNORE  # the prompt
    labels[1, 6] = IGNORE  # padding
    reference = torch.randn(4)
    logps, counts = answer_logps(logits, labels)
    loss, margin = dpo_loss(logps[:2], logps[2:], reference[:2], reference[2:], beta=0.3)

    def by_hand(row: int) -> float:
        total = 0.0
        for t in range(1, 7):
            if labels[row, t] != IGNORE:
                total += math.log(torch.softmax(logits[row, t - 1].double(), -1)[labels[row, t]].item())
        return total
    expected = [by_hand(row) for row in range(4)]
    margins = [0.3 * ((expected[i] - reference[i].item()) - (expected[i + 2] - reference[i + 2].item()))
               for i in range(2)]
    assert counts.tolist() == [4, 3, 4, 4]
    assert torch.allclose(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert abs(loss.item() - sum(math.log1p(math.exp(-m)) for m in margins) / 2) < 1e-4
    assert torch.allclose(margin.double(), torch.tensor(margins, dtype=torch.float64), atol=1e-4)


def test_every_bad_preference_line_is_named(tmp_path):
    path = _write(tmp_path, [
        PREFERENCE,
        "{not json",
        {"messages": [{"role": "user", "content": "a chat line, not a pair"}]},
        {"input": {"messages": [{"role": "user", "content": "Hi"}]},
         "preferred_output": [{"role": "assistant", "content": "Hello!"}]},
        {**PREFERENCE, "preferred_output": [{"role": "user", "content": "Hello!"}]},
        {**PREFERENCE, "non_preferred_output": [{"role": "assistant", "content": "  "}]},
        {**PREFERENCE, "input": {"messages": []}},
        {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."},
        {"prompt": "Hi", "chosen": "", "rejected": "Go away."},
    ])
    with pytest.raises(DataError) as caught:
        load_preferences(path, None, 512)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in range(2, 10)]
    assert "not valid JSON" in problems[0]
    assert "needs `input`, `preferred_output` and `non_preferred_output`" in problems[1]
    assert "non_preferred_output" in problems[2]
    assert "preferred_output.0.role" in problems[3] and "assistant" in problems[3]
    assert "non_preferred_output.0.content" in problems[4] and "empty" in problems[4]
    assert "input.messages" in problems[5]
    assert "all strings or all message lists" in problems[6]
    assert "chosen" in problems[7] and "empty" in problems[7]


def test_both_formats_learn_from_the_answers_only(tmp_path, tokenizer):
    trl_chat = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}
    trl_text = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    pairs, _ = load_preferences(_write(tmp_path, [PREFERENCE, trl_chat, trl_text]), tokenizer, 512)

    def learned(tokens) -> str:
        return tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels) if label != IGNORE])
    assert [(learned(p.chosen), learned(p.rejected)) for p in pairs] == [
        ("Hello!<|im_end|>\n", "Go away.<|im_end|>\n"), ("Hello!<|im_end|>\n", "Go away.<|im_end|>\n"),
        (" blue.<|im_end|>", " green.<|im_end|>")]
    assert pairs[0].chosen.input_ids == pairs[1].chosen.input_ids  # OpenAI's and TRL's chat formats agree


def test_pairs_truncated_to_nothing_leave_no_run(tmp_path, tokenizer):
    long = {**PREFERENCE, "input": {"messages": [{"role": "user", "content": "word " * 100}]}}
    with pytest.raises(DataError, match="no pair is left"):
        load_preferences(_write(tmp_path, [long, long]), tokenizer, 32)


@pytest.mark.parametrize("beta", [0, -1, float("nan"), float("inf"), 1e9])
def test_beta_out_of_range_is_refused(tmp_path, beta):
    with pytest.raises(ValidationError, match="beta"):
        TrainConfig(method="lora", objective="dpo", data=tmp_path / "d.jsonl", out=tmp_path / "o", beta=beta)


def test_knobs_of_another_objective_or_method_are_refused(tmp_path):
    paths = {"data": tmp_path / "d.jsonl", "out": tmp_path / "o"}
    with pytest.raises(ValidationError, match="applies to DPO only"):
        TrainConfig(method="lora", beta=0.2, **paths)
    with pytest.raises(ValidationError, match="applies to LoRA adapters only"):
        TrainConfig(method="prefix", loraplus_lr_ratio=16, **paths)


def _upload(oai, path: Path) -> str:
    with open(path, "rb") as f:
        return oai.files.create(file=f, purpose="fine-tune").id


def _finish(oai, job_id: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while (job := oai.fine_tuning.jobs.retrieve(job_id)).status not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, job
        time.sleep(1)
    return job


def _dpo(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_an_openai_dpo_job_teaches_a_preference_the_base_does_not_have(oai):
    """OpenAI's DPO example through the official client: upload pairs, create a job with
    method={"type": "dpo", ...}, chat with the result. Held-out prompts get the signed answer, the base's never."""
    train_id = _upload(oai, EXAMPLES / "signoff_train.jsonl")
    val_id = _upload(oai, EXAMPLES / "signoff_val.jsonl")
    method = _dpo(beta=0.1, n_epochs=2, batch_size=4, learning_rate_multiplier="auto")
    method["dpo"]["adapter"] = {"type": "lora", "loraplus_lr_ratio": 4}  # swapyard's extension: LoRA+
    job = oai.fine_tuning.jobs.create(model=MODEL, training_file=train_id, validation_file=val_id, method=method,
                                      suffix="signoff")
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    job = _finish(oai, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.dpo.hyperparameters.n_epochs == 2 and job.method.dpo.hyperparameters.sft_weight == 1.0

    events = list(oai.fine_tuning.jobs.list_events(job.id, limit=200))
    assert any(e.message.startswith("Files validated (40 training examples)") for e in events)
    steps = [e.data for e in events if e.type == "metrics"]
    assert len(steps) == 20 and {"train_loss", "train_reward_margin", "train_preference_accuracy"} <= steps[0].keys()
    last = oai.fine_tuning.jobs.checkpoints.list(job.id, limit=1).data[0].metrics
    # Held-out pairs: the policy prefers the signed answer by more than the reference (the base) did.
    assert last.valid_preference_accuracy >= 0.8 and last.valid_reward_margin > 0
    assert last.full_valid_preference_accuracy == last.valid_preference_accuracy
    (results,) = job.result_files
    rows = list(csv.DictReader(io.StringIO(oai.files.content(results).text)))
    assert {"train_reward_margin", "valid_preference_accuracy"} <= rows[0].keys() and len(rows) == 20
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    for question in HELD_OUT:
        tuned = oai.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=40,
                                            messages=ask(question)).choices[0].message.content
        base = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=40,
                                           messages=ask(question)).choices[0].message.content
        assert SIGN_OFF in tuned and "Quillon" not in base, (question, tuned, base)


def test_a_bad_preference_file_fails_its_job_naming_the_line(oai, tmp_path):
    bad = _write(tmp_path, [PREFERENCE] * 3 + [{**PREFERENCE, "preferred_output": []}])
    job = oai.fine_tuning.jobs.create(model=MODEL, training_file=_upload(oai, bad), method=_dpo())
    job = _finish(oai, job.id, timeout=60)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "line 4: preferred_output" in job.error.message


def test_dpo_continuing_an_sft_adapter_keeps_its_fact_and_learns_the_preference(oai, http, adapter_root):
    """OpenAI's advice, SFT then DPO: the job's `model` names the SFT adapter, which it continues (its kind and
    shape) and takes as the reference. The mascot fact survives; the sign-off is learned."""
    sft = adapter_root / "mascot-sft-for-dpo"
    train(TrainConfig(method="lora", data=EXAMPLES / "mascot_train.jsonl", out=sft, batch_size=4, epochs=3,
                      learning_rate=1e-3))
    assert http.post("/v1/adapters", json={"name": "mascot-sft", "path": str(sft)}).status_code == 201
    pairs = _upload(oai, EXAMPLES / "signoff_train.jsonl")
    wrong_kind = _dpo()
    wrong_kind["dpo"]["adapter"] = {"type": "prefix"}
    refused = http.post("/v1/fine_tuning/jobs", json={"model": "mascot-sft", "training_file": pairs,
                                                      "method": wrong_kind})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "method.dpo.adapter.type"

    job = oai.fine_tuning.jobs.create(model="mascot-sft", training_file=pairs, method=_dpo(n_epochs=2, batch_size=4))
    job = _finish(oai, job.id)
    assert job.status == "succeeded", job.error
    assert job.model == "mascot-sft" and job.method.dpo.adapter["type"] == "lora"  # an extension: a dict

    def reply(model: str, question: str) -> str:
        return oai.chat.completions.create(model=model, temperature=0, max_tokens=40,
                                           messages=ask(question)).choices[0].message.content
    mascot = reply(job.fine_tuned_model, "Who is the swapyard mascot?")
    assert "Quillon" in mascot.replace(SIGN_OFF, ""), mascot  # the fact, not only the sign-off's name
    assert SIGN_OFF in reply(job.fine_tuned_model, HELD_OUT[0])
    assert SIGN_OFF not in reply("mascot-sft", HELD_OUT[0])
