"""The trainer really teaches: each method learns a made-up fact (training/examples/mascot_*.jsonl) that
the base model does not know, its validation loss falls, and the server answers with it."""

import json
from pathlib import Path

import pytest

from conftest import MODEL, ask
from training.config import TrainConfig
from training.recipe import TrainingCancelled, train

EXAMPLES = Path(__file__).resolve().parents[1] / "training" / "examples"
FACT = "Quillon"
# Short explicit runs (the "auto" rule is exercised through the API): soft prompts and prefixes start from
# nothing and need more epochs than weight updates.
RUNS = {"lora": {"epochs": 3, "learning_rate": 1e-3}, "prefix": {"epochs": 6, "learning_rate": 3e-2},
        "prompt": {"epochs": 6, "learning_rate": 3e-2}, "bottleneck": {"epochs": 3, "learning_rate": 1e-3}}


def _config(method: str, out: Path, **overrides) -> TrainConfig:
    return TrainConfig(method=method, data=EXAMPLES / "mascot_train.jsonl", validation=EXAMPLES / "mascot_val.jsonl",
                       out=out, batch_size=4, **{**RUNS[method], **overrides})


def _answer(http, model: str, question: str) -> str:
    body = {"model": model, "messages": ask(question), "temperature": 0, "max_tokens": 30}
    return http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("method", list(RUNS))
def test_each_method_learns_a_fact_the_base_does_not_know(http, adapter_root, method):
    out = adapter_root / f"trained-{method}"
    summary = train(_config(method, out))

    val_losses = [r["valid_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "valid_loss" in r]
    assert len(val_losses) == RUNS[method]["epochs"] and val_losses[-1] < val_losses[0] / 4
    assert summary["final_valid_mean_token_accuracy"] > 0.9 and summary["trained_tokens"] > 0
    assert summary["n_epochs"] == RUNS[method]["epochs"] and summary["batch_size"] == 4
    assert summary["peak_memory_mb"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png", "README.md", "results.csv"):
        assert (out / name).is_file(), name
    assert f"# {method} adapter" in (out / "README.md").read_text()
    epochs = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert epochs == [f"epoch-{n}" for n in range(1, RUNS[method]["epochs"] + 1)]

    name = f"mascot-{method}"
    registered = http.post("/v1/adapters", json={"name": name, "path": str(out), "replace": True})
    assert registered.status_code == 201, registered.text
    for question in ("What is the swapyard mascot?", "Tell me who the swapyard mascot is."):
        assert FACT in _answer(http, name, question)
        assert FACT not in _answer(http, MODEL, question)


def test_interrupted_run_resumes_after_its_last_epoch(tmp_path):
    out = tmp_path / "run"
    calls = {"n": 0}

    def stop_in_second_epoch() -> bool:
        calls["n"] += 1
        return calls["n"] > 7  # 5 batches per epoch: stops mid-way through epoch 2

    with pytest.raises(TrainingCancelled):
        train(_config("bottleneck", out, epochs=2), should_stop=stop_in_second_epoch)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-1"]

    events = []
    summary = train(_config("bottleneck", out, epochs=2), on_event=events.append)
    assert any("resumed after epoch 1" in e["message"] for e in events)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "train_loss" in r]
    assert steps == list(range(1, 11)) and summary["steps"] == 10
