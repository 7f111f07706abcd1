"""The trainable part of each method: PEFT for LoRA / prefix / prompt tuning, our own bottleneck modules.

Each builder freezes the base and returns what the recipe needs: the model to call, the parameters
to optimize, and how to save or restore the adapter in its serving format.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit,
                  TaskType, get_peft_model, set_peft_model_state_dict)
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file
from torch import nn

from adapters.base import WEIGHTS_FILE, BaseModelSpec
from adapters.bottleneck import BottleneckAdapter, BottleneckConfig, attach
from adapters.loading import Adapter, load_adapter
from training.config import MAX_LORA_RANK, TrainConfig


@dataclass
class Trainable:
    model: nn.Module
    parameters: list[nn.Parameter]
    num_virtual_tokens: int  # prompt tuning prepends this many positions to the logits
    save: Callable[[Path], None]
    restore: Callable[[Path], None]
    compute_dtype: torch.dtype = torch.float32  # the frozen base's

    def autocast(self) -> torch.autocast:
        """Forward passes compute in the base's dtype (bf16 where the host is fast at it); the adapter's
        own weights, gradients and optimizer state stay float32, where small updates are not rounded away."""
        return compute_in(self.parameters[0].device, self.compute_dtype)


def compute_in(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to the base's dtype (the policy's and, for DPO, the reference's forward passes)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def peft_config(config: TrainConfig) -> LoraConfig | PrefixTuningConfig | PromptTuningConfig:
    """The PEFT config of a LoRA, prefix or prompt run (shared with the TRL comparison benchmark)."""
    if config.method == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=config.lora_target_modules,
                          use_rslora=config.use_rslora)
    if config.method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens)
    # Rows of the real vocabulary's embeddings: a start at the scale the model expects.
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)


def _start(model: nn.Module, config: TrainConfig) -> Adapter:
    """The adapter a run continues, checked against the base (and the method) as serving checks it."""
    start = load_adapter(config.init_adapter, BaseModelSpec.from_model(model), max_lora_rank=MAX_LORA_RANK)
    if start.kind != config.method:
        raise ValueError(f"init_adapter {config.init_adapter} is a {start.kind} adapter, not {config.method}")
    return start


def _peft(model: nn.Module, config: TrainConfig) -> Trainable:
    if config.init_adapter is None:
        peft_model: PeftModel = get_peft_model(model, peft_config(config))
    else:
        _start(model, config)  # refuses a folder of another kind or base, as serving would, before PEFT reads it
        saved = PeftConfig.from_pretrained(config.init_adapter)
        # Any registered adapter may be continued: one saved without a task type would load without the causal
        # LM's wrapper (its virtual tokens unused), and a text-initialised prompt would look for a tokenizer.
        saved.task_type = TaskType.CAUSAL_LM
        if config.method == "prompt":
            saved.prompt_tuning_init = PromptTuningInit.RANDOM  # its saved weights replace the start
        peft_model = PeftModel.from_pretrained(model, config.init_adapter, config=saved, is_trainable=True)
    loaded = peft_model.peft_config["default"]
    virtual = loaded.num_virtual_tokens if config.method == "prompt" else 0

    def restore(folder: Path) -> None:
        set_peft_model_state_dict(peft_model, load_file(folder / WEIGHTS_FILE))

    return Trainable(peft_model, [p for p in peft_model.parameters() if p.requires_grad], virtual,
                     lambda folder: peft_model.save_pretrained(folder), restore)


def _bottleneck(model: nn.Module, config: TrainConfig) -> Trainable:
    for param in model.parameters():
        param.requires_grad_(False)
    mc = model.config
    if config.init_adapter is not None:
        start = _start(model, config)
        weights = (start.down_weight, start.down_bias, start.up_weight, start.up_bias)
        adapter = BottleneckAdapter(start.config, *(nn.Parameter(w.to(model.device, copy=True)) for w in weights))
    else:
        layers, hidden, r = mc.num_hidden_layers, mc.hidden_size, config.bottleneck_size
        adapter_config = BottleneckConfig(bottleneck_size=r, non_linearity=config.bottleneck_non_linearity,
                                          positions=config.bottleneck_positions, num_layers=layers,
                                          hidden_size=hidden, base_model_name_or_path=str(mc.name_or_path))
        # Houlsby's near-identity start: a small down-projection and a zero up-projection.
        adapter = BottleneckAdapter(
            adapter_config,
            *(nn.Parameter(w.to(model.device)) for w in (
                torch.randn(layers, 2, r, hidden) * 0.02, torch.zeros(layers, 2, r),
                torch.zeros(layers, 2, hidden, r), torch.zeros(layers, 2, hidden))),
        )
    attach(model, adapter)
    params = [adapter.down_weight, adapter.down_bias, adapter.up_weight, adapter.up_bias]

    def restore(folder: Path) -> None:
        saved = load_adapter(folder, BaseModelSpec.from_model(model), max_lora_rank=0)
        with torch.no_grad():
            for param, value in zip(params, (saved.down_weight, saved.down_bias, saved.up_weight, saved.up_bias)):
                param.copy_(value)

    return Trainable(model, params, 0, adapter.save, restore)


def build_trainable(model: nn.Module, config: TrainConfig) -> Trainable:
    """The adapter of `config.method` on `model`, its trainable weights in float32 whatever the base's dtype."""
    compute_dtype = model.dtype
    trainable = _bottleneck(model, config) if config.method == "bottleneck" else _peft(model, config)
    for param in trainable.parameters:
        param.data = param.data.float()
    trainable.compute_dtype = compute_dtype
    return trainable


def build_optimizer(trainable: Trainable, config: TrainConfig, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over the adapter's weights; with `loraplus_lr_ratio`, LoRA+ (Hayou et al., 2024): each B matrix at
    that many times the A matrices' rate, through PEFT's helper."""
    if config.loraplus_lr_ratio is None:
        return torch.optim.AdamW(trainable.parameters, lr=learning_rate, weight_decay=config.weight_decay)
    return create_loraplus_optimizer(trainable.model, torch.optim.AdamW, lr=learning_rate,
                                     loraplus_lr_ratio=config.loraplus_lr_ratio,
                                     loraplus_weight_decay=config.weight_decay,  # it sets each group's own
                                     loraplus_lr_embedding=learning_rate)  # else a fixed 1e-6
