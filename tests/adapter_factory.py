"""Small random adapters of every kind for the embedded model, saved in their on-disk formats.

Random but tame: each changes the model's greedy answer without turning it into noise, so parity
between the engine and the references is checked on realistic logits.
"""

from pathlib import Path

import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from adapters.bottleneck import BottleneckAdapter, BottleneckConfig

KINDS = ("lora", "prefix", "prompt", "bottleneck")


def _peft_config(kind: str, model_path: Path, seed: int, lora_targets: str | list[str], rank: int | None,
                 num_virtual_tokens: int | None, prefix_projection: bool):
    if kind == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank or 4 + 4 * (seed % 2), lora_alpha=16,
                          use_rslora=seed % 2 == 1,
                          target_modules=lora_targets, init_lora_weights=False)
    if kind == "prefix":
        # With prefix_projection PEFT trains an MLP over the embeddings and saves its output.
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens or 6,
                                  prefix_projection=prefix_projection, encoder_hidden_size=64)
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text="Always answer like a pirate.",
                              tokenizer_name_or_path=str(model_path))


def make_peft_adapter(kind: str, model_path: Path, out: Path, seed: int = 0,
                      lora_targets: str | list[str] = "all-linear", rank: int | None = None,
                      num_virtual_tokens: int | None = None, prefix_projection: bool = False) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = _peft_config(kind, model_path, seed, lora_targets, rank, num_virtual_tokens, prefix_projection)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
            elif kind == "prefix" and "prompt_encoder" in name:
                param.mul_(0.5)
            elif kind == "prompt" and "prompt_encoder" in name:
                param.add_(torch.randn_like(param) * 0.01)
    peft_model.save_pretrained(out)
    return out


def make_bottleneck(num_layers: int, hidden: int, out: Path, seed: int = 0, positions=("attn", "mlp"),
                    non_linearity: str = "relu", size: int = 8) -> Path:
    gen = torch.Generator().manual_seed(seed)
    config = BottleneckConfig(bottleneck_size=size, non_linearity=non_linearity, positions=list(positions),
                              num_layers=num_layers, hidden_size=hidden, scaling=0.5)

    def rand(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    BottleneckAdapter(config, rand(num_layers, 2, size, hidden, std=0.05), rand(num_layers, 2, size, std=0.05),
                      rand(num_layers, 2, hidden, size, std=0.2), rand(num_layers, 2, hidden, std=0.01)).save(out)
    return out


def make_adapter(kind: str, model_path: Path, out: Path, seed: int = 0,
                 lora_targets: str | list[str] = "all-linear", rank: int | None = None) -> Path:
    if kind == "bottleneck":
        config = AutoModelForCausalLM.from_pretrained(model_path).config
        return make_bottleneck(config.num_hidden_layers, config.hidden_size, out, seed)
    return make_peft_adapter(kind, model_path, out, seed, lora_targets, rank)
