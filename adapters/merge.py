"""Fold a LoRA into its base: a standalone HF model folder that plain transformers or vLLM load."""

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.base import AdapterError, BaseModelSpec
from adapters.loading import load_adapter
from adapters.lora import LoraAdapter


def merge_lora(base_path: Path, adapter_folder: Path, out: Path) -> Path:
    """W' = W + scale * B A for every LoRA layer; other adapter kinds are not linear in the weights."""
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    adapter = load_adapter(adapter_folder, BaseModelSpec.from_model(base), max_lora_rank=2**16)
    if adapter.kind != LoraAdapter.kind:
        raise AdapterError("peft_type", f"only LoRA adapters fold into the weights; this one is {adapter.kind}")
    merged = PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return out
