"""The OpenAI wire format: request bodies (validated) and response bodies (typed)."""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

FinishReason = Literal["stop", "length"]
MAX_STOP_CHARS = 256

# OpenAI fields swapyard does not implement yet: refused (400 naming the field) unless they carry the
# value that means "off", rather than silently ignored, so a client never mistakes what it got.
_NOT_YET = {
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "best_of": (1,), "suffix": ("",),
}
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound (vLLM's default max_logprobs)
MAX_CHOICES = 16  # choices one request may ask for (n x prompts): each runs as its own sequence


def _encodable(value):
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" parses from JSON), which
    tokenizers cannot encode. Takes a string or a list of them; anything else passes through."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"holds an invalid character at position {exc.start} (a lone surrogate)") from None
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; known ones are strictly checked.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str
    _valid_text = field_validator("text")(_encodable)


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    _valid_text = field_validator("content", "name")(_encodable)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class SamplingFields(_Request):
    """Fields both endpoints share. Extensions, as vLLM names them: top_k (0 = off), min_p,
    repetition_penalty, stop_token_ids, min_tokens, ignore_eos. Sampling fields left out take the model's
    defaults (its generation_config.json) where the server applies them, else OpenAI's."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    # JSON keys are strings: "50256" is read as token 50256.
    logit_bias: Annotated[dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] \
        | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    min_tokens: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch generators take
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("stop")
    @classmethod
    def _short_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if any(len(s) > MAX_STOP_CHARS for s in ([value] if isinstance(value, str) else value or [])):
            raise ValueError(f"each stop string may be at most {MAX_STOP_CHARS} characters")
        return _encodable(value)

    @field_validator(*_NOT_YET)
    @classmethod
    def _not_yet(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value not in _NOT_YET[info.field_name]:
            raise ValueError(f"`{info.field_name}` is not supported by this server yet; omit it")
        return value

    def num_logprobs(self) -> int | None:
        """Top logprobs per token asked for (0: the chosen token's only); None: no logprobs."""
        return None

    def num_prompt_logprobs(self) -> int | None:
        """The same for the prompt's tokens."""
        return None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs `logprobs: true`")
        return value

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompts = Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
TokenPrompts = Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)]


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | Prompts | TokenPrompts = Field(min_length=1)  # one prompt, or a batch of them
    _valid_text = field_validator("prompt")(_encodable)
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this endpoint; 0 with echo: scoring only
    echo: bool = False  # the prompt leads the text (and, with logprobs, the logprobs: its first token's is null)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        # OpenAI omits absent delta fields: the closing chunk's delta is `{}`.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "swapyard"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
