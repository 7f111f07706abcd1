"""Prefix tuning in the vLLM engine: placeholder tokens whose K/V a KV connector writes into the paged cache
(server/engine/vllm/prefix.py)."""

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from vllm import SamplingParams as VLLMSamplingParams
from vllm.inputs import TokensPrompt

from adapters.base import AdapterError
from adapters.prefix import PrefixAdapter
from server.engine.base import GenerationRequest
from server.engine.vllm.kinds.base import Served, salted
from server.engine.vllm.prefix import PARAMS_KEY

if TYPE_CHECKING:
    from server.engine.vllm.engine import VLLMEngine


@dataclass
class ServedPrefix(Served):
    """Placeholder tokens whose K/V the KV connector (vllm/prefix.py) writes into the paged cache."""

    runs_own_worker_code = True
    adapter: PrefixAdapter
    prefix_id: int  # its K/V in the workers; requests name it to the connector

    @classmethod
    async def load(cls, engine: "VLLMEngine", name: str, adapter: PrefixAdapter, folder: Path) -> "ServedPrefix":
        prefix_id = engine.new_id()
        file = engine.folder(prefix_id) / "kv.safetensors"
        file.parent.mkdir()
        await asyncio.to_thread(save_file, {"keys": adapter.keys, "values": adapter.values}, file)
        await engine.to_worker(prefix_id, "prefix", str(file))
        return cls(adapter, prefix_id)

    @property
    def worker_ids(self) -> list[int]:
        return [self.prefix_id]

    @property
    def num_placeholders(self) -> int:
        return self.adapter.num_virtual_tokens

    def prompt(self, engine: "VLLMEngine", request: GenerationRequest) -> TokensPrompt:
        token_ids = request.prompt_token_ids
        # Copies of the first token: their K/V come from the adapter, and repetition penalties see no new token.
        prompt = TokensPrompt(prompt_token_ids=token_ids[:1] * self.num_placeholders + token_ids)
        # Cached blocks of this version only: the placeholders are the same tokens for every prefix adapter.
        return salted(prompt, f"{request.cache_salt or ''}/prefix-{self.prefix_id}")

    def prepare(self, sampling: VLLMSamplingParams) -> None:
        # vLLM computes prompt logprobs only for the tokens it runs (it skips every cache read for them, the
        # connector's too): the placeholders would run as plain tokens, or leave rows it never fills.
        if sampling.prompt_logprobs is not None:
            raise AdapterError("echo", "prompt logprobs (echo with logprobs) are not available for prefix adapters "
                                       "on the vLLM engine: their positions come from the adapter, not a forward "
                                       "pass; ask without echo, or serve with --engine torch")
        sampling.extra_args = {"kv_transfer_params": {PARAMS_KEY: self.prefix_id,
                                                      "num_virtual_tokens": self.num_placeholders}}
