"""HTTP routes: OpenAI wire format in, router calls, OpenAI wire format (JSON or SSE) out."""

import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.engine.base import GenerationRequest
from adapters.base import AdapterError
from server.dependencies import get_router
from server.errors import APIError, adapter_api_error
from server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    Completion, CompletionChoice, CompletionRequest, DeltaMessage, ErrorResponse, ModelList, new_id,
)
from server.router import Router, raise_for_failure, usage_of

api = APIRouter()


def _sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"


def _sse_stream(router: Router, request: GenerationRequest, include_usage: bool,
                first: BaseModel | None, chunk: Callable[[str, str | None], BaseModel],
                usage_chunk: Callable[..., BaseModel]) -> StreamingResponse:
    """One SSE response: an optional opening event, a chunk per text delta, a finish chunk, usage, [DONE]."""

    async def events() -> AsyncIterator[str]:
        if first is not None:
            yield _sse(first)
        try:
            async for out in router.stream(request):
                raise_for_failure(out)
                if out.text:
                    yield _sse(chunk(out.text, None))
                if out.is_finished:
                    yield _sse(chunk("", out.finish_reason))
                    if include_usage:
                        yield _sse(usage_chunk(usage_of(out)))
        except AdapterError as exc:  # headers are sent: the error travels as an event, as OpenAI's do
            yield _sse(adapter_api_error(exc).body)
        except APIError as err:
            yield _sse(err.body)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@api.post("/v1/chat/completions", response_model=ChatCompletion, responses={400: {"model": ErrorResponse},
                                                                            404: {"model": ErrorResponse}})
async def chat_completions(body: ChatCompletionRequest, router: Router = Depends(get_router)):
    prompt = await router.chat_prompt(body.messages)
    request = router.build(body, prompt, body.max_completion_tokens or body.max_tokens, "messages")
    response_id, created = new_id("chatcmpl"), int(time.time())
    if not body.stream:
        done = await router.complete(request)
        message = AssistantMessage(content=done.text)
        return ChatCompletion(id=response_id, created=created, model=body.model, usage=done.usage,
                              choices=[ChatChoice(message=message, finish_reason=done.finish_reason)])

    def chunk(text: str, finish_reason: str | None, delta: DeltaMessage | None = None) -> ChatCompletionChunk:
        delta = delta or (DeltaMessage(content=text) if text else DeltaMessage())
        return ChatCompletionChunk(id=response_id, created=created, model=body.model,
                                   choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)])

    def usage_chunk(usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=[], usage=usage)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first = chunk("", None, DeltaMessage(role="assistant", content=""))
    return _sse_stream(router, request, include_usage, first, chunk, usage_chunk)


@api.post("/v1/completions", response_model=Completion, responses={400: {"model": ErrorResponse},
                                                                  404: {"model": ErrorResponse}})
async def completions(body: CompletionRequest, router: Router = Depends(get_router)):
    request = router.build(body, await router.text_prompt(body.prompt), body.max_tokens, "prompt")
    response_id, created = new_id("cmpl"), int(time.time())
    if not body.stream:
        done = await router.complete(request)
        return Completion(id=response_id, created=created, model=body.model, usage=done.usage,
                          choices=[CompletionChoice(text=done.text, finish_reason=done.finish_reason)])

    def chunk(text: str, finish_reason: str | None) -> Completion:
        return Completion(id=response_id, created=created, model=body.model,
                          choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

    def usage_chunk(usage) -> Completion:
        return Completion(id=response_id, created=created, model=body.model, choices=[], usage=usage)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _sse_stream(router, request, include_usage, None, chunk, usage_chunk)


@api.get("/v1/models", response_model=ModelList)
async def list_models(router: Router = Depends(get_router)) -> ModelList:
    return router.models()
