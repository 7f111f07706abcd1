"""The OpenAI wire format: request bodies (validated) and response bodies (typed)."""

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator,
)

from server.engine.base import OutputConstraint

FinishReason = Literal["stop", "length", "tool_calls"]
MAX_STOP_CHARS = 256

# OpenAI fields swapyard does not implement yet: refused (400 naming the field) unless they carry the
# value that means "off", rather than silently ignored, so a client never mistakes what it got.
_NOT_YET = {
    "functions": ([],),
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


USER_HEADER = "x-swapyard-user"  # sticks a user to one version of a split alias, where `user` is not given
VERSION_HEADER = "x-swapyard-version"  # on each answer: the adapter versions that gave it


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; known ones are strictly checked. Field
    # docstrings are the descriptions in the OpenAPI schema and docs/reference/request-fields.md.
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)


class StreamOptions(_Request):
    include_usage: bool = False
    """A last chunk, with no choices, carries the usage of the whole response."""


class TextPart(_Request):
    type: Literal["text"]
    text: str
    _valid_text = field_validator("text")(_encodable)


class CalledFunction(BaseModel):
    name: str = Field(max_length=64)
    arguments: str  # JSON text, as OpenAI sends it
    _valid_text = field_validator("name", "arguments")(_encodable)


class ToolCall(BaseModel):
    """A call the assistant made: in responses, and in the history a client sends back."""

    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    """Text, or text parts (no images or audio); only an assistant message with tool_calls may omit it."""
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    """An assistant message's calls, as a response returned them."""
    tool_call_id: str | None = Field(None, max_length=128)
    """A tool message: the id of the call it answers."""
    _valid_text = field_validator("content", "name")(_encodable)

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None
    _valid_text = field_validator("description")(_encodable)


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
MAX_STOPS = 4  # OpenAI's


def _decimal_key(key: object) -> object:
    """A token id given as a JSON object key: its decimal digits exactly, so that "05", "+5", " 5" and "5.0"
    are refused rather than read as token 5 (and two keys never name one token)."""
    if isinstance(key, str) and not re.fullmatch(r"0|[1-9][0-9]*", key):
        raise ValueError(f"{key!r} is not a token id (decimal digits, such as \"50256\")")
    return key


TokenIdKey = Annotated[TokenId, BeforeValidator(_decimal_key)]
MAX_SPEC_CHARS = 100_000  # a schema, regex or grammar: compiled per distinct text, so bounded


class JsonSchemaFormat(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    """`json_object`: any JSON object; `json_schema`: JSON that matches `json_schema.schema`."""
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a `json_schema` object with the `schema`")
        return self


class StructuredOutputs(_Request):
    """vLLM's extension: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    """A JSON schema (an object, or its text) the output must match."""
    regex: str | None = Field(None, max_length=MAX_SPEC_CHARS)
    """A regular expression the whole output must match."""
    choice: Annotated[list[str], Field(min_length=1, max_length=256)] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = Field(None, max_length=MAX_SPEC_CHARS)
    """An EBNF grammar (xgrammar's dialect, as vLLM's) the output must match."""
    json_object: bool | None = None
    """true: any JSON object."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class SamplingFields(_Request):
    """Fields both endpoints share. Extensions, as vLLM names them: top_k (0 = off), min_p,
    repetition_penalty, stop_token_ids, min_tokens, ignore_eos. Sampling fields left out take the model's
    defaults (its generation_config.json) where the server applies them, else OpenAI's."""

    model: str = Field(max_length=256)
    """The base model's name, a registered adapter's (its newest version), a pinned version (`NAME@N`,
    `NAME@sha256:HEX`) or an alias (`GET /v1/models` lists names and aliases)."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """Unset: the model's default (SmolLM2: 0.2), else OpenAI's 1. Under 1e-5: greedy."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Nucleus sampling. Unset: the model's default (SmolLM2: 0.9), else 1."""
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    """vLLM's extension: sample from the k likeliest tokens (0: off). Unset: the model's default, else off."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """vLLM's extension: drop tokens under min_p times the top token's probability. Unset: the model's default,
    else 0."""
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    """On the tokens generated so far, as vLLM applies it."""
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    """On the tokens generated so far, as vLLM applies it."""
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    """vLLM's extension. Unset: the model's default, else 1."""
    # JSON keys are strings: "50256" is read as token 50256.
    logit_bias: Annotated[dict[TokenIdKey, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] \
        | None = None
    """Token id (a JSON string key, such as "50256") to a bias added to its logit."""
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    """vLLM's extension: token ids that end a choice."""
    min_tokens: int = Field(0, ge=0)
    """vLLM's extension: end-of-sequence tokens and stop_token_ids are barred until this many tokens."""
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch generators take
    """Seeds the request's own generator: the same tokens whatever it is batched with; choice i of n uses
    seed + i."""
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    """Up to 4 strings of at most 256 characters; a choice ends before the first one it generates."""
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Choices per prompt, each its own sequence; n x prompts may be at most 16."""
    stream: bool = False
    """Server-sent events, as OpenAI's, ending with `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    """With stream: `include_usage`."""
    ignore_eos: bool = False
    """vLLM's extension: generate max_tokens whatever end-of-sequence token the model emits."""
    cache_salt: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^\\/@\x00]+$")  # vLLM's limits
    """vLLM's extension: cached prompt prefixes are shared only between requests of the same salt, so a tenant
    that salts its requests cannot be probed through time to first token."""
    user: str | None = Field(None, max_length=256)
    """OpenAI's end-user id. Here it also keeps a user on one version of an alias that splits traffic (else the
    X-Swapyard-User header does; without either, each request draws a version)."""
    response_format: ResponseFormat | None = None
    """`text`, `json_object` or `json_schema` (the openai client's `chat.completions.parse` works). Compiled with
    xgrammar; a bad schema is a 400; JSON is generated compact."""
    structured_outputs: StructuredOutputs | None = None
    """vLLM's extension: exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`. Not together with
    response_format."""
    functions: Any = None
    """Not implemented: a 400 naming it unless `[]`."""
    function_call: Any = None
    """Not implemented: a 400 naming it unless `"none"`."""
    best_of: Any = None
    """Not implemented: a 400 naming it unless `1`."""
    suffix: Any = None
    """Not implemented: a 400 naming it unless `""`."""

    @field_validator("stop", mode="before")
    @classmethod
    def _few_stops(cls, value: Any) -> Any:
        """Said plainly: past the limit, the union's first member spoke ("Input should be a valid string")."""
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return value

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

    def constraint(self) -> OutputConstraint | None:
        """What the output must match: response_format, or vLLM's structured_outputs (not both)."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type == "json_object" or so is not None and so.json_object:
            return OutputConstraint(kind="json_object")
        if rf is not None and rf.type == "json_schema":
            kind, spec = "json", rf.json_schema.schema_
        elif so is None:
            return None
        elif so.json_ is not None:
            kind, spec = "json", so.json_
        elif so.choice is not None:
            kind, spec = "choice", so.choice
        else:
            kind, spec = ("regex", so.regex) if so.regex else ("grammar", so.grammar)
        # Key order kept: a schema's property order is the order the object is generated in.
        return OutputConstraint(kind=kind, spec=spec if isinstance(spec, str) else json.dumps(spec))

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation, rendered with the model's chat template."""
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    """Functions the model may call: rendered by the chat template where it knows tools, else put into the system
    prompt in the Hermes format."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """`auto`: Hermes `<tool_call>` blocks in the output are parsed into tool_calls; `required` and a named
    function are enforced by a grammar, so the output is a valid call."""
    parallel_tool_calls: bool = True
    """false: at most one call per reply; true: under `required`, at most as many calls as there are tools."""
    max_tokens: int | None = Field(None, gt=0)
    """Most tokens to generate. Unset: up to the rest of the context (at most the server's --max-tokens-limit)."""
    max_completion_tokens: int | None = Field(None, gt=0)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    """Each generated token's logprob, of the model's raw distribution (before temperature, penalties, bias or
    grammar), streamed too."""
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """This many likeliest alternatives per token; needs logprobs: true."""

    @field_validator("tools")
    @classmethod
    def _distinct_tool_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        if value is not None and len({t.function.name for t in value}) < len(value):
            raise ValueError("two tools have one name: a call could not say which it is")
        return value

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
    """Text, token ids, or a list of either (at most 16 prompts). Choices are prompt-major: index = prompt x n +
    choice."""
    _valid_text = field_validator("prompt")(_encodable)
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this endpoint; 0 with echo: scoring only
    """Most tokens to generate: OpenAI's default 16 when left out; null: up to the rest of the context. 0 with echo
    scores the prompt only."""
    echo: bool = False  # the prompt leads the text (and, with logprobs, the logprobs: its first token's is null)
    """The prompt leads the text; with logprobs, the prompt's tokens lead the logprobs (the first is null)."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """The chosen token's logprob and this many alternatives per token, in the legacy shape."""

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
    content: str | None
    tool_calls: list[ToolCall] | None = None


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


class ToolCallDelta(ToolCall):
    index: int  # which call of the message this delta belongs to


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

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
