"""Prompt tuning in PEFT's format: soft prompt embeddings placed before the prompt's token embeddings."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import PromptTuningConfig

from adapters.base import AdapterError, BaseModelSpec, expect_shape, require


@dataclass(frozen=True)
class PromptAdapter:
    kind: ClassVar[str] = "prompt"
    embeddings: torch.Tensor  # (virtual, hidden)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]


def load_prompt(config: PromptTuningConfig, tensors: dict[str, torch.Tensor], base: BaseModelSpec) -> PromptAdapter:
    if config.token_dim != base.hidden_size:
        raise AdapterError("token_dim", f"{config.token_dim}, but the base model's hidden size is {base.hidden_size}")
    if config.num_transformer_submodules != 1:
        raise AdapterError("num_transformer_submodules", "only decoder-only models (1) are supported")
    embeddings = require("prompt_embeddings", tensors, "prompt_embeddings")
    expect_shape("prompt_embeddings", embeddings, (config.num_virtual_tokens, base.hidden_size))
    return PromptAdapter(embeddings)
