"""Prompt tuning in the torch engine: the soft prompt rides in as the input embeddings of the sequence's
virtual positions; nothing inside the model."""

from dataclasses import replace

from adapters.prompt import PromptAdapter
from server.engine.torch.kinds.base import TorchKind


class PromptKind(TorchKind):
    kind = PromptAdapter.kind

    def place(self, resident) -> None:
        resident.adapter = replace(resident.adapter, embeddings=self.bank.cast(resident.adapter.embeddings,
                                                                               "prompt_embeddings"))

    def soft_prompt(self, resident):
        return resident.adapter.embeddings
