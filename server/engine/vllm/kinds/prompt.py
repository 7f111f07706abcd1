"""Prompt tuning in the vLLM engine: prompt embeddings (enable_prompt_embeds)."""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from vllm.inputs import EmbedsPrompt

from adapters.prompt import PromptAdapter
from server.engine.base import GenerationRequest
from server.engine.vllm.kinds.base import Served, salted

if TYPE_CHECKING:
    from server.engine.vllm.engine import VLLMEngine


@dataclass
class ServedPrompt(Served):
    """Prompt embeddings (enable_prompt_embeds): the soft prompt rows, then the prompt's tokens', as PEFT
    feeds them."""

    adapter: PromptAdapter

    @classmethod
    async def load(cls, engine: "VLLMEngine", name: str, adapter: PromptAdapter, folder: Path) -> "ServedPrompt":
        await engine.ensure_token_embeddings()
        return cls(adapter)

    def prompt(self, engine: "VLLMEngine", request: GenerationRequest) -> EmbedsPrompt:
        tokens = engine.token_embeddings[torch.tensor(request.prompt_token_ids)]
        embeds = torch.cat([self.adapter.embeddings, tokens]).to(engine.dtype)
        return salted(EmbedsPrompt(prompt_embeds=embeds), request.cache_salt)
