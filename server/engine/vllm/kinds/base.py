"""What every adapter kind gives the vLLM engine: what its requests carry into vLLM, what it holds there."""

from pathlib import Path
from typing import TYPE_CHECKING

from vllm import SamplingParams as VLLMSamplingParams
from vllm.inputs import EmbedsPrompt, TokensPrompt
from vllm.lora.request import LoRARequest

from adapters.loading import Adapter
from adapters.lora import LoraAdapter
from server.engine.base import GenerationRequest

if TYPE_CHECKING:
    from server.engine.vllm.engine import VLLMEngine


class Served:
    """One adapter version as the vLLM engine serves it. Each kind says in its subclass what its requests
    carry into vLLM and what it holds there; adding a kind is adding a subclass to KINDS. The base model's
    requests are served by this class itself."""

    lora: LoraAdapter | None = None  # the LoRA its requests carry (a bottleneck's is all zero); None: the base's
    folds = False  # whether merging folds its LoRA into the base weights (a bottleneck's zero LoRA does not)
    # Whether its requests run swapyard's own code in vLLM's workers (the KV connector, the bottleneck op): the
    # kinds --torch-beside-vllm serves on a torch engine instead.
    runs_own_worker_code = False
    request: LoRARequest | None = None  # that LoRA in vLLM while nothing is merged
    compensated: LoRARequest | None = None  # the same with the merged LoRA taken back out, while one is merged

    @classmethod
    def check(cls, engine: "VLLMEngine", adapter: Adapter) -> None:
        """Raise AdapterError when the engine cannot serve this adapter, before anything is loaded."""

    @classmethod
    async def load(cls, engine: "VLLMEngine", name: str, adapter: Adapter, folder: Path) -> "Served":
        """Put `adapter` (stored in `folder`) into vLLM and its workers."""
        raise NotImplementedError

    @property
    def worker_ids(self) -> list[int]:
        """Ids of what the workers hold for this version besides its LoRAs (a prefix's K/V): each request
        holds them until it ends."""
        return []

    @property
    def ids(self) -> list[int]:
        """Every id this version holds in vLLM and its workers, freed when it leaves."""
        return [r.lora_int_id for r in (self.request, self.compensated) if r is not None] + self.worker_ids

    async def attach(self, engine: "VLLMEngine", lora_id: int) -> None:
        """Give the workers what requests carrying LoRA `lora_id` need besides the LoRA."""

    def prompt(self, engine: "VLLMEngine", request: GenerationRequest) -> TokensPrompt | EmbedsPrompt:
        return salted(TokensPrompt(prompt_token_ids=request.prompt_token_ids), request.cache_salt)

    def prepare(self, sampling: VLLMSamplingParams) -> None:
        """Add what vLLM needs for this kind to a request's sampling parameters (or refuse the request)."""


def salted(prompt: TokensPrompt | EmbedsPrompt, salt: str | None) -> TokensPrompt | EmbedsPrompt:
    if salt is not None:
        prompt["cache_salt"] = salt
    return prompt
