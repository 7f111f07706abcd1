"""HTTP routes: OpenAI wire format in, router calls, OpenAI wire format (JSON or SSE) out."""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.engine.base import GenerationOutput, GenerationRequest, TokenLogprob
from adapters.base import AdapterError
from server.dependencies import get_router, get_tenant
from server.errors import APIError, adapter_api_error
from server.web.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    MAX_CHOICES, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, DeltaMessage, ErrorResponse,
    ModelCard, ModelList, SamplingFields, ToolCallDelta, USER_HEADER, VERSION_HEADER, Usage, new_id,
)
from server.router import Router, raise_for_failure, total_usage, usage_of
from server.tools import ToolPlan
from server.web.disconnect import cancelled_if_client_leaves

api = APIRouter()


def _user(http: Request, body: SamplingFields) -> str | None:
    """Who an alias's traffic split keeps on one version: the request's `user`, else the X-Swapyard-User
    header (set by a gateway), else nobody (a version by chance)."""
    return body.user if body.user is not None else http.headers.get(USER_HEADER)


def _served_by(requests: list[GenerationRequest]) -> dict[str, str]:
    """The X-Swapyard-Version header: the adapter versions (`name@N`) that answer, so a client of an alias or a
    traffic split knows which it got; none for the base model."""
    versions = sorted({r.adapter.label for r in requests if r.adapter is not None})
    return {VERSION_HEADER: ",".join(versions)} if versions else {}


def _sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"


# (choice index, an engine output) -> the SSE event carrying its delta, or None when it carries nothing
Delta = Callable[[int, GenerationOutput], BaseModel | None]


def _sse_stream(router: Router, requests: list[GenerationRequest], n: int, include_usage: bool,
                first: list[BaseModel], delta: Delta, finish: Callable[[int, str], BaseModel],
                usage_chunk: Callable[[Usage], BaseModel]) -> StreamingResponse:
    """One SSE response for every choice: opening events, a chunk per delta, a finish chunk per choice,
    usage, [DONE]."""

    async def events() -> AsyncIterator[str]:
        for event in first:
            yield _sse(event)
        usages: list[Usage | None] = [None] * len(requests)
        try:
            async with aclosing(router.stream_all(requests)) as outputs:
                async for i, out in outputs:
                    raise_for_failure(out)
                    if (event := delta(i, out)) is not None:
                        yield _sse(event)
                    if out.is_finished:
                        yield _sse(finish(i, out.finish_reason))
                        usages[i] = usage_of(out)
            if include_usage:
                yield _sse(usage_chunk(total_usage(usages, n)))
        except AdapterError as exc:  # headers are sent: the error travels as an event, as OpenAI's do
            yield _sse(adapter_api_error(exc).body)
        except APIError as err:
            yield _sse(err.body)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **_served_by(requests)})


@api.post("/v1/chat/completions", response_model=ChatCompletion, responses={400: {"model": ErrorResponse},
                                                                            404: {"model": ErrorResponse}})
async def chat_completions(http: Request, response: Response, body: ChatCompletionRequest,
                           router: Router = Depends(get_router)):
    try:
        tools = ToolPlan.of(body)
    except ValueError as exc:
        raise APIError(400, str(exc), param="tool_choice") from exc
    async with cancelled_if_client_leaves(http):
        prompt = await router.chat_prompt(body.messages, tools)
        request = await router.build(body, prompt, body.max_completion_tokens or body.max_tokens, "messages",
                                     get_tenant(http), tools, _user(http, body))
    requests = router.fan_out(request, body.n)
    response_id, created = new_id("chatcmpl"), int(time.time())

    def message(text: str, finish_reason: str) -> tuple[AssistantMessage, str]:
        """The reply, with tool calls parsed out of the text when tools are in play."""
        content, calls = tools.parse(text) if tools is not None else (text, [])
        if not calls:
            return AssistantMessage(content=content), finish_reason
        # A call cut off by max_tokens says so ("length"): its arguments may be incomplete JSON.
        return AssistantMessage(content=content, tool_calls=calls), "tool_calls" if finish_reason == "stop" \
            else finish_reason

    if not body.stream:
        async with cancelled_if_client_leaves(http):
            done = await router.complete(requests)
        response.headers.update(_served_by(requests))
        choices = [ChatChoice(index=i, message=reply, finish_reason=reason,
                              logprobs=router.logprobs.chat(d.logprobs) if d.logprobs is not None else None)
                   for i, d in enumerate(done) for reply, reason in [message(d.text, d.finish_reason)]]
        return ChatCompletion(id=response_id, created=created, model=body.model, choices=choices,
                              usage=total_usage([d.usage for d in done], body.n))

    buffered = [""] * len(requests)  # with tools, a reply is parsed whole, then sent as one delta

    def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=[choice])

    def delta(index: int, out: GenerationOutput) -> ChatCompletionChunk | None:
        if tools is not None:
            buffered[index] += out.text
            return None
        if not (out.text or out.logprobs):
            return None
        return chunk(ChatChunkChoice(index=index, delta=DeltaMessage(content=out.text or None),
                                     logprobs=router.logprobs.chat(out.logprobs) if out.logprobs else None))

    def finish(index: int, reason: str) -> ChatCompletionChunk:
        if tools is None:
            return chunk(ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason))
        reply, reason = message(buffered[index], reason)
        calls = [ToolCallDelta(index=k, **call.model_dump()) for k, call in enumerate(reply.tool_calls or [])]
        return chunk(ChatChunkChoice(index=index, finish_reason=reason,
                                     delta=DeltaMessage(content=reply.content, tool_calls=calls or None)))

    def usage_chunk(usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=[], usage=usage)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first = [chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))) for i in range(body.n)]
    return _sse_stream(router, requests, body.n, include_usage, first, delta, finish, usage_chunk)


@api.post("/v1/completions", response_model=Completion, responses={400: {"model": ErrorResponse},
                                                                  404: {"model": ErrorResponse}})
async def completions(http: Request, response: Response, body: CompletionRequest,
                      router: Router = Depends(get_router)):
    prompts = body.prompts()
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} choices exceed this server's limit of "
                            f"{MAX_CHOICES} per request.", param="n")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing: it is for scoring a prompt, with echo: true.",
                       param="max_tokens")
    requests, echoes = [], []
    async with cancelled_if_client_leaves(http):
        for prompt in prompts:  # prompt-major: choice index = prompt index x n + choice
            prompt_ids = await router.text_prompt(prompt)
            request = await router.build(body, prompt_ids, body.max_tokens, "prompt", get_tenant(http),
                                         user=_user(http, body))
            requests += router.fan_out(request, body.n)
            echo = (prompt if isinstance(prompt, str) else router.tokenizer.decode(prompt)) if body.echo else ""
            echoes += [echo] * body.n
    response_id, created = new_id("cmpl"), int(time.time())

    def logprobs_of(prompt_logprobs: list[TokenLogprob] | None, logprobs: list[TokenLogprob] | None,
                    offset: int) -> CompletionLogprobs | None:
        """A choice's logprobs from `offset` characters on; an echo leads with the prompt's."""
        if body.logprobs is None:
            return None
        return router.logprobs.completion((prompt_logprobs or []) + (logprobs or []), offset)

    if not body.stream:
        async with cancelled_if_client_leaves(http):
            done = await router.complete(requests)
        response.headers.update(_served_by(requests))
        choices = [CompletionChoice(index=i, text=echoes[i] + d.text, finish_reason=d.finish_reason,
                                    logprobs=logprobs_of(d.prompt_logprobs, d.logprobs, 0))
                   for i, d in enumerate(done)]
        return Completion(id=response_id, created=created, model=body.model, choices=choices,
                          usage=total_usage([d.usage for d in done], body.n))

    sent = [0] * len(requests)  # characters streamed per choice: where its next text_offset starts
    started = [False] * len(requests)

    def chunk(choice: CompletionChoice) -> Completion:
        return Completion(id=response_id, created=created, model=body.model, choices=[choice])

    def delta(index: int, out: GenerationOutput) -> Completion | None:
        text = out.text if started[index] else echoes[index] + out.text
        prompt_logprobs = None if started[index] else out.prompt_logprobs
        started[index] = True
        logprobs = logprobs_of(prompt_logprobs, out.logprobs, sent[index]) if prompt_logprobs or out.logprobs else None
        if not (text or logprobs):
            return None
        sent[index] += len(text)
        return chunk(CompletionChoice(index=index, text=text, logprobs=logprobs))

    def finish(index: int, reason: str) -> Completion:
        return chunk(CompletionChoice(index=index, text="", finish_reason=reason))

    def usage_chunk(usage: Usage) -> Completion:
        return Completion(id=response_id, created=created, model=body.model, choices=[], usage=usage)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _sse_stream(router, requests, body.n, include_usage, [], delta, finish, usage_chunk)


@api.get("/v1/models", response_model=ModelList)
async def list_models(router: Router = Depends(get_router)) -> ModelList:
    return await router.models()


@api.get("/v1/models/{model}", response_model=ModelCard)
async def show_model(model: str, router: Router = Depends(get_router)) -> ModelCard:
    return await router.model(model)
