"""LoRA in PEFT's format: y = W x + scale * B (A x) on any linear layer of the base.

scale is alpha / r, or alpha / sqrt(r) with rsLoRA; `alpha_pattern` overrides alpha per module as in PEFT.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from adapters.base import WEIGHTS_FILE, AdapterError, BaseModelSpec, check_finite, expect_shape

# PEFT saves `base_model.model.<module>.lora_A.weight` (the adapter name is dropped on save).
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # (rank, in_features)
    b: torch.Tensor  # (out_features, rank)
    scale: float


@dataclass(frozen=True)
class LoraAdapter:
    kind: ClassVar[str] = "lora"
    num_virtual_tokens: ClassVar[int] = 0
    layers: dict[str, LoraWeights]  # base module name -> weights

    @property
    def rank(self) -> int:
        return max(w.a.shape[0] for w in self.layers.values())

    def scaled(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (A, scale * B): the update is B A with nothing left to scale."""
        return {module: (w.a, w.b * w.scale) for module, w in self.layers.items()}


def _refuse_unsupported(config: LoraConfig) -> None:
    if config.use_dora:
        raise AdapterError("use_dora", "DoRA adapters are not supported")
    if config.lora_bias:
        raise AdapterError("lora_bias", "LoRA B biases are not supported; train with lora_bias=False")
    if config.modules_to_save:
        raise AdapterError("modules_to_save", "fully fine-tuned extra modules are not supported")
    if config.fan_in_fan_out:
        raise AdapterError("fan_in_fan_out", "only nn.Linear targets (fan_in_fan_out=false) are supported")


def _unexpected(key: str) -> AdapterError:
    """Name the feature a tensor that is not a LoRA A or B comes from, and how to save without it."""
    if ".lora_embedding_" in key:
        return AdapterError("target_modules", f"`{key}`: LoRA on embedding layers is not supported; leave "
                                              f"embed_tokens out of target_modules")
    if key.endswith(".base_layer.weight") or key.endswith(("embed_tokens.weight", "lm_head.weight")):
        return AdapterError("save_embedding_layers", f"`{key}` is a full base-model weight (PEFT saves it when "
                                                     f"embed_tokens or lm_head is targeted); save the adapter "
                                                     f"with save_embedding_layers=False")
    if key.endswith(".bias"):
        return AdapterError("bias", f"`{key}`: trained biases (bias='all' or 'lora_only' on a base with "
                                    f"biases, or lora_bias) are not supported; train with bias='none'")
    return AdapterError(WEIGHTS_FILE, f"unexpected tensor `{key}` in a LoRA adapter")


def load_lora(config: LoraConfig, tensors: dict[str, torch.Tensor], base: BaseModelSpec, max_rank: int) -> LoraAdapter:
    # bias='all' / 'lora_only' on a base without biases saves LoRA tensors only, which serve exactly:
    # a bias tensor, if there is one, is refused below by name.
    _refuse_unsupported(config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _unexpected(key)
        parts.setdefault(match["module"], {})[match["part"]] = tensor.float()
    if not parts:
        raise AdapterError(WEIGHTS_FILE, "holds no LoRA weights")
    layers = {}
    for module, pair in sorted(parts.items()):
        if module not in base.linear_shapes:
            raise AdapterError("target_modules", f"`{module}` is not a linear layer of the base model")
        if set(pair) != {"A", "B"}:
            raise AdapterError(WEIGHTS_FILE, f"`{module}` needs both lora_A and lora_B")
        out_features, in_features = base.linear_shapes[module]
        rank = pair["A"].shape[0]
        if rank > max_rank:
            raise AdapterError("r", f"rank {rank} of `{module}` exceeds the server's max_lora_rank {max_rank}")
        expect_shape(f"{module}.lora_A", pair["A"], (rank, in_features))
        expect_shape(f"{module}.lora_B", pair["B"], (out_features, rank))
        alpha_key = get_pattern_key(list(config.alpha_pattern), module)
        alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        scale = check_finite("lora_alpha", alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)
        if not torch.isfinite(pair["B"] * scale).all():
            raise AdapterError("lora_alpha", f"scale {scale} times `{module}.lora_B` overflows")
        layers[module] = LoraWeights(pair["A"], pair["B"], scale)
    return LoraAdapter(layers)


def save_lora(folder: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write module -> (A (rank, in), B (out, rank)) as a PEFT LoRA with scale 1, zero-padded to one rank."""
    rank = max(a.shape[0] for a, _ in layers.values())
    tensors = {}
    for module, (a, b) in layers.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = F.pad(a, (0, 0, 0, pad)).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = F.pad(b, (0, pad)).contiguous()
    targets = sorted({module.rpartition(".")[2] for module in layers})
    LoraConfig(r=rank, lora_alpha=rank, target_modules=targets).save_pretrained(str(folder))
    save_file(tensors, folder / WEIGHTS_FILE)
