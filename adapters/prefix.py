"""Prefix tuning in PEFT's format: learned keys/values that every layer attends to before the prompt.

PEFT stores them as `prompt_embeddings` (virtual, layers * 2 * kv_heads * head_dim); the prompt's
positions start after the virtual tokens, as PEFT offsets them.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import PrefixTuningConfig

from adapters.base import AdapterError, BaseModelSpec, expect_shape, require


@dataclass(frozen=True)
class PrefixAdapter:
    kind: ClassVar[str] = "prefix"
    keys: torch.Tensor  # (layers, kv_heads, virtual, head_dim)
    values: torch.Tensor  # (layers, kv_heads, virtual, head_dim)

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[2]


def load_prefix(config: PrefixTuningConfig, tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> PrefixAdapter:
    if config.num_layers != base.num_layers:
        raise AdapterError("num_layers", f"{config.num_layers}, but the base model has {base.num_layers} layers")
    kv_dim = base.num_kv_heads * base.head_dim
    if config.token_dim != kv_dim:
        raise AdapterError("token_dim", f"{config.token_dim}, but the base model's key/value width is {kv_dim}")
    if config.num_transformer_submodules != 1:
        raise AdapterError("num_transformer_submodules", "only decoder-only models (1) are supported")
    virtual = config.num_virtual_tokens
    embeddings = require("prompt_embeddings", tensors, "prompt_embeddings")
    expect_shape("prompt_embeddings", embeddings, (virtual, base.num_layers * 2 * kv_dim))
    # (virtual, layers, key|value, kv_heads, head_dim): PEFT's layout of past_key_values.
    kv = embeddings.view(virtual, base.num_layers, 2, base.num_kv_heads, base.head_dim)
    return PrefixAdapter(kv[:, :, 0].permute(1, 2, 0, 3).contiguous(), kv[:, :, 1].permute(1, 2, 0, 3).contiguous())
