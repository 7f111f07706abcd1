"""`swapyard merge` folds a LoRA into a standalone model that plain transformers loads and that answers
as the served adapter does; other kinds are refused."""

import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ask

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
