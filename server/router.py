"""Routing: resolve the requested model, render and check the prompt, run it, record its metrics."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.adapter_manager import AdapterManager
from server.engine.residency import AdapterRef
from server.engine.base import (
    Engine, GenerationOutput, GenerationRequest, OutputConstraint, SamplingParams, TokenLogprob,
)
from server.errors import APIError
from server.logprobs import LogprobFormatter
from server.grammar_workers import WorkersBusy
from server.structured import GrammarCompiler
from server.tenancy import Tenants
from server.tools import ToolPlan, render_message
from server.metrics import RequestMetrics
from server.web.protocol import ChatMessage, ModelCard, ModelList, SamplingFields, Usage, new_id

log = logging.getLogger(__name__)


@dataclass
class Completed:
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None  # when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None


def usage_of(out: GenerationOutput) -> Usage:
    return Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_generated_tokens,
                 total_tokens=out.num_prompt_tokens + out.num_generated_tokens)


def raise_for_failure(out: GenerationOutput) -> None:
    """Engine-side endings that are not a normal finish become API errors."""
    if out.refusal is not None:
        raise out.refusal
    if out.finish_reason == "abort":
        raise APIError(503, out.error or "request aborted", type="server_error", code="aborted",
                       headers={"Retry-After": "5"})
    if out.finish_reason == "error":
        raise APIError(500, out.error or "generation failed", type="server_error")


class Router:
    def __init__(self, engine: Engine, adapters: AdapterManager, tokenizer: PreTrainedTokenizerBase,
                 base_model: str, max_model_len: int, *, max_prompt_tokens: int | None = None,
                 max_tokens_limit: int | None = None, sampling_defaults: dict[str, float] | None = None,
                 grammars: GrammarCompiler, tenants: Tenants, prefix_cache_across_keys: bool = False):
        self.engine, self.adapters, self.tokenizer = engine, adapters, tokenizer
        self.base_model, self.max_model_len = base_model, max_model_len
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self.sampling_defaults = sampling_defaults or {}  # the model's, for fields a request leaves out
        self.logprobs = LogprobFormatter(tokenizer)
        self.grammars, self.tenants = grammars, tenants
        self.prefix_cache_across_keys = prefix_cache_across_keys
        self._created = int(time.time())

    async def models(self) -> ModelList:
        view = self.adapters.view()
        cards = [self._card(name, record.created_at) for name, record in sorted(view.adapters.items())]
        cards += [self._card(name, alias.updated_at) for name, alias in sorted(view.aliases.items())]
        return ModelList(data=[self._base_card(), *cards])

    async def model(self, name: str) -> ModelCard:
        if name == self.base_model:
            return self._base_card()
        ref, _ = await self.resolve(name)
        return self._card(name, ref.registered_at)

    def _base_card(self) -> ModelCard:
        return ModelCard(id=self.base_model, created=self._created, root=self.base_model,
                         max_model_len=self.max_model_len)

    def _card(self, name: str, created: float) -> ModelCard:
        return ModelCard(id=name, created=int(created), root=self.base_model, parent=self.base_model,
                         max_model_len=self.max_model_len)

    async def resolve(self, name: str, user: str | None = None) -> tuple[AdapterRef | None, str]:
        """The adapter version `name` is served by now (an alias picks by `user`; None for the base model), and
        the name its metrics carry (a pinned version's written as `name@N`, however the request spelled it)."""
        if name == self.base_model:
            return None, name
        found = await self.adapters.resolve(name, user)
        if found is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return found

    async def chat_prompt(self, messages: list[ChatMessage], tools: ToolPlan | None = None) -> list[int]:
        knows_tools = "tools" in str(self.tokenizer.chat_template or "")
        conversation = [render_message(m, knows_tools) for m in messages]
        extra = tools.render_tools(conversation, knows_tools) if tools is not None else {}
        return await self._tokenize("messages", lambda: self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False, **extra))

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

    async def build(self, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None, prompt_param: str,
                    tenant: str, tools: ToolPlan | None = None, user: str | None = None) -> GenerationRequest:
        """The engine request for `body`; `tenant` keeps its compiled constraint and its cached prompt blocks
        apart from other tenants', and the engine's fair queue serves it by its tenant's weight. An alias's
        traffic split picks its version by `user`."""
        ref, label = await self.resolve(body.model, user)
        num_virtual = ref.num_virtual_tokens if ref is not None else 0  # positions it adds before the prompt
        if not prompt_ids:  # nothing to prefill, so nothing to decode from: an engine would never finish it
            raise APIError(400, f"{prompt_param} gives no tokens to generate from", param=prompt_param,
                           code="empty_prompt")
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
        if max_tokens is None:
            max_tokens = min(limit - num_prompt, self.max_tokens_limit or limit)
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens {body.min_tokens} exceeds max_tokens {max_tokens}.", param="min_tokens")
        for param, ids in (("logit_bias", body.logit_bias or {}), ("stop_token_ids", body.stop_token_ids or [])):
            if any(i >= len(self.tokenizer) for i in ids):
                raise APIError(400, f"{param} names a token id outside the vocabulary (0..{len(self.tokenizer) - 1})",
                               param=param)
        constraint, grammar, param = await self._constraint(body, tools, tenant)
        sampling = SamplingParams(
            constraint=constraint, max_tokens=max_tokens, seed=body.seed, stop=body.stop_strings(),
            ignore_eos=body.ignore_eos,
            **self._with_defaults(body, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0),
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=tuple(sorted((body.logit_bias or {}).items())), stop_token_ids=tuple(body.stop_token_ids or ()),
            min_tokens=body.min_tokens, logprobs=body.num_logprobs(), prompt_logprobs=body.num_prompt_logprobs(),
        )
        return GenerationRequest(new_id("req"), prompt_ids, sampling, label, ref,
                                 self._cache_salt(tenant, body.cache_salt), grammar=grammar, constraint_param=param,
                                 tenant=tenant, weight=self.tenants.weight(tenant))

    async def _constraint(self, body: SamplingFields, tools: ToolPlan | None, tenant: str
                          ) -> tuple[OutputConstraint | None, Any, str]:
        """(what the output must match, compiled, the request field it came from). Under tool_choice `auto`
        the calls are free text, but each tool's parameters must still be typed as JSON Schema."""
        param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        try:
            constraint = body.constraint()
            call_constraint = tools.constraint() if tools is not None else None
            if call_constraint is not None:
                if constraint is not None:
                    raise ValueError(f"tool_choice {tools.choice!r} constrains the output itself; leave it out")
                constraint, param = call_constraint, "tools"
        except ValueError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from exc
        if tools is not None and call_constraint is None:
            try:
                tools.check_types()
            except ValueError as exc:
                raise APIError(400, f"tools: {exc}", param="tools") from exc
        return constraint, await self._compile(constraint, tenant, param) if constraint is not None else None, param

    async def _compile(self, constraint: OutputConstraint, tenant: str, param: str) -> Any:
        try:
            return await self.grammars.compile(constraint, tenant)
        except ValueError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from exc
        except WorkersBusy:
            raise APIError(503, f"every structured-output compiler stayed busy for {self.grammars.budget_s:g} s; "
                                f"retry shortly", type="server_error", code="grammar_workers_busy",
                           headers={"Retry-After": "5"}) from None

    def _cache_salt(self, tenant: str, salt: str | None) -> str | None:
        """The request's own salt within its tenant's: cached blocks are shared within a tenant, never across
        tenants (unless the operator allows it). A client's salt cannot contain "/", so no two differ only in
        where one ends."""
        if not tenant or self.prefix_cache_across_keys:
            return salt
        return f"{tenant}/{salt}" if salt is not None else tenant

    @staticmethod
    def fan_out(request: GenerationRequest, n: int) -> list[GenerationRequest]:
        """n choices of one request, each its own sequence; with a seed, choice i samples with seed + i, so
        the choices differ and the whole response is reproducible."""
        if n == 1:
            return [request]
        seed = request.sampling.seed
        return [replace(request, request_id=new_id("req"), sampling=request.sampling.model_copy(
            update={"seed": None if seed is None else seed + i})) for i in range(n)]

    def _with_defaults(self, body: SamplingFields, **openai_defaults: float) -> dict[str, float]:
        """Each field as the request gives it, else the model's default, else OpenAI's (or vLLM's)."""
        return {name: value if (value := getattr(body, name)) is not None else self.sampling_defaults.get(name, default)
                for name, default in openai_defaults.items()}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Engine outputs for one request, its tokens charged to its tenant; leaving early (client gone) aborts
        it in the engine."""
        version = request.adapter.label if request.adapter is not None else ""
        metrics = RequestMetrics(request.model, version, request.tenant, len(request.prompt_token_ids),
                                 request.arrival_time)
        self.tenants.charge(request.tenant, len(request.prompt_token_ids))
        finish_reason = "abort"
        try:
            with self.adapters.using(request.adapter):
                async with aclosing(self.engine.generate(request)) as outputs:
                    async for out in outputs:
                        metrics.observe(out)
                        self.tenants.charge(request.tenant, len(out.token_ids))
                        finish_reason = out.finish_reason or finish_reason
                        yield out
        finally:
            metrics.close(finish_reason)

    async def stream_all(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """(choice index, output) from several requests as they come; leaving early aborts all of them, and
        an error in one (e.g. its adapter went away) ends the whole response."""
        if len(requests) == 1:
            async with aclosing(self.stream(requests[0])) as outputs:
                async for out in outputs:
                    yield 0, out
            return
        queue: asyncio.Queue[tuple[int, GenerationOutput | Exception]] = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async with aclosing(self.stream(request)) as outputs:
                    async for out in outputs:
                        await queue.put((index, out))
            except Exception as exc:
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            for _ in range(len(requests)):
                while True:
                    index, item = await queue.get()
                    if isinstance(item, Exception):
                        raise item
                    yield index, item
                    if item.is_finished:
                        break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def complete(self, requests: list[GenerationRequest]) -> list[Completed]:
        """Each request run to its end, side by side: one Completed per request, in order."""
        parts: list[list[str]] = [[] for _ in requests]
        logprobs = [[] if r.sampling.logprobs is not None else None for r in requests]
        last: list[GenerationOutput | None] = [None] * len(requests)
        prompt_logprobs: list[list[TokenLogprob] | None] = [None] * len(requests)
        async with aclosing(self.stream_all(requests)) as outputs:
            async for i, out in outputs:
                raise_for_failure(out)
                parts[i].append(out.text)
                if logprobs[i] is not None:
                    logprobs[i] += out.logprobs or []
                prompt_logprobs[i] = prompt_logprobs[i] or out.prompt_logprobs
                last[i] = out
        return [Completed("".join(p), out.finish_reason, usage_of(out), lp, plp)
                for p, out, lp, plp in zip(parts, last, logprobs, prompt_logprobs)]


def total_usage(usages: list[Usage], n: int) -> Usage:
    """Usage of a response of n choices per prompt (requests prompt-major): each prompt counts once."""
    prompt = sum(u.prompt_tokens for u in usages[::n])
    completion = sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
