"""Routing: resolve the requested model, render and check the prompt, run it, record its metrics."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, nullcontext
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from server.adapter_manager import AdapterManager
from server.engine.base import Engine, GenerationOutput, GenerationRequest, SamplingParams
from server.errors import APIError
from server.metrics import RequestMetrics
from server.protocol import ChatMessage, ModelCard, ModelList, SamplingFields, Usage, new_id

log = logging.getLogger(__name__)


@dataclass
class Completed:
    text: str
    finish_reason: str
    usage: Usage


def usage_of(out: GenerationOutput) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_generated_tokens,
                 total_tokens=out.num_prompt_tokens + out.num_generated_tokens)


def raise_for_failure(out: GenerationOutput) -> None:
    """Engine-side endings that are not a normal finish become API errors."""
    if out.finish_reason == "abort":
        raise APIError(503, out.error or "request aborted", type="server_error", code="aborted",
                       headers={"Retry-After": "5"})
    if out.finish_reason == "error":
        raise APIError(500, out.error or "generation failed", type="server_error")


class Router:
    def __init__(self, engine: Engine, adapters: AdapterManager, tokenizer: PreTrainedTokenizerBase,
                 base_model: str, max_model_len: int, *, max_prompt_tokens: int | None = None,
                 max_tokens_limit: int | None = None):
        self.engine, self.adapters, self.tokenizer = engine, adapters, tokenizer
        self.base_model, self.max_model_len = base_model, max_model_len
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self._created = int(time.time())

    def models(self) -> ModelList:
        base = ModelCard(id=self.base_model, created=self._created, root=self.base_model,
                         max_model_len=self.max_model_len)
        adapters = [ModelCard(id=r.name, created=int(r.created_at), root=self.base_model, parent=self.base_model,
                              max_model_len=self.max_model_len) for r in self.adapters.registry.list()]
        return ModelList(data=[base, *adapters])

    def resolve(self, name: str) -> tuple[str | None, int]:
        """(adapter name or None for the base, virtual tokens it adds before the prompt)."""
        if name == self.base_model:
            return None, 0
        record = self.adapters.get(name)
        if record is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return name, record.num_virtual_tokens

    async def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in messages]
        return await self._tokenize("messages", lambda: self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False))

    async def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return await self._tokenize("prompt", lambda: self.tokenizer.encode(prompt, add_special_tokens=False))
        if max(prompt) >= len(self.tokenizer) or min(prompt) < 0:
            raise APIError(400, f"prompt holds a token id outside the vocabulary (0..{len(self.tokenizer) - 1})",
                           param="prompt")
        return prompt

    @staticmethod
    async def _tokenize(param: str, work: Callable[[], list[int]]) -> list[int]:
        """Templates and tokenizers run in a thread (megabytes of text take seconds); what they refuse
        (a template's own checks, text they cannot encode) is the client's 400."""
        try:
            return await asyncio.to_thread(work)
        except Exception as exc:
            log.warning("tokenizing %s failed: %s", param, exc)
            raise APIError(400, f"{param} could not be tokenized: {str(exc)[:200]}", param=param) from exc

    def build(self, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None,
              prompt_param: str) -> GenerationRequest:
        adapter, num_virtual = self.resolve(body.model)
        if self.max_prompt_tokens is not None and len(prompt_ids) > self.max_prompt_tokens:
            raise APIError(400, f"The prompt has {len(prompt_ids)} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}.", param=prompt_param, code="prompt_too_long")
        if self.max_tokens_limit is not None and max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {self.max_tokens_limit}.",
                           param="max_tokens", code="max_tokens_exceeded")
        # Soft-prompt and prefix positions take context like prompt tokens do.
        limit, num_prompt = self.max_model_len - num_virtual, len(prompt_ids)
        if num_prompt >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                                f"{num_prompt} tokens. Please shorten it.", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the "
                                f"completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        sampling = SamplingParams(
            max_tokens=max_tokens or min(limit - num_prompt, self.max_tokens_limit or limit),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=body.stop_strings(),
            ignore_eos=body.ignore_eos,
        )
        return GenerationRequest(new_id("req"), prompt_ids, sampling, body.model, adapter)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Engine outputs for one request; leaving early (client gone) aborts it in the engine."""
        metrics = RequestMetrics(request.model, len(request.prompt_token_ids), request.arrival_time)
        finish_reason = "abort"
        try:
            async with self._adapter_held(request.adapter), aclosing(self.engine.generate(request)) as outputs:
                async for out in outputs:
                    metrics.observe(out)
                    finish_reason = out.finish_reason or finish_reason
                    yield out
        finally:
            metrics.close(finish_reason)

    def _adapter_held(self, adapter: str | None):
        return self.adapters.use(adapter) if adapter is not None else nullcontext()

    async def complete(self, request: GenerationRequest) -> Completed:
        parts: list[str] = []
        async with aclosing(self.stream(request)) as outputs:
            async for out in outputs:
                raise_for_failure(out)
                parts.append(out.text)
        return Completed("".join(parts), out.finish_reason, usage_of(out))
