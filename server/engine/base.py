"""The contract between the router and any engine (torch or vLLM)."""

import time
from collections import deque
from pathlib import Path
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import AdapterError

if TYPE_CHECKING:
    from adapters.loading import Adapter
    from server.engine.residency import AdapterRef

FinishReason = Literal["stop", "length", "abort", "error"]

# Below this a temperature is greedy: dividing logits by 1e-300 overflows to inf (vLLM uses the same bound).
GREEDY_TEMPERATURE = 1e-5


class OutputConstraint(BaseModel):
    """What the output must match (structured outputs), in vLLM's terms: a JSON schema (as JSON text), any
    JSON object, a regular expression, one of a list of strings (as JSON text), or an EBNF grammar."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    spec: str = ""


class SamplingParams(BaseModel):
    """Per-request sampling, as vLLM defines each field; a temperature under GREEDY_TEMPERATURE means greedy.

    The logits go through, in vLLM's order: min_tokens (end tokens barred), logit_bias, the repetition,
    frequency and presence penalties; then temperature, min_p, top_k and top_p. Logprobs are of the raw
    distribution, before any of that (vLLM's default, `raw_logprobs`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(ge=0)  # 0: score the prompt only (prompt_logprobs), generate nothing
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = no top-k filter
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # drop tokens below min_p x the top token's probability
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # once per token id already generated
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # per occurrence in the generated tokens
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)  # CTRL's: divides (multiplies) prompt+output logits
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # end the sequence like an end-of-sequence token does
    min_tokens: int = Field(0, ge=0)  # end tokens (EOS and stop_token_ids) are barred before this many
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating through end-of-sequence tokens (benchmarks)
    logprobs: int | None = Field(None, ge=0)  # the chosen token's logprob plus this many top ones
    prompt_logprobs: int | None = Field(None, ge=0)  # the same for every prompt token (the first has none)
    constraint: OutputConstraint | None = None  # structured outputs: tokens that would break it are masked

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def changes_logits(self) -> bool:
        """Anything to apply before temperature (a row without it is left untouched, at no cost)."""
        return bool(self.min_tokens or self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    model: str  # the name the client asked for (a pinned version as `name@N`); labels the metrics
    adapter: "AdapterRef | None" = None  # the adapter version it was routed to, None for the base model
    cache_salt: str | None = None  # prefix-cache blocks are shared only between requests with the same salt
    arrival_time: float = field(default_factory=time.monotonic)
    # sampling.constraint compiled for the torch engine's token masks (an xgrammar CompiledGrammar); vLLM
    # compiles its own from the constraint.
    grammar: Any = None
    constraint_param: str = "response_format"  # the request field its constraint came from, named in errors
    tenant: str = ""  # who sent it: the engine's fair queue serves tenants by `weight` (server/tenancy.py)
    weight: float = 1.0

    def __post_init__(self):
        # A sequence of no tokens is never prefilled nor decoded, yet would count as work forever.
        if not self.prompt_token_ids:
            raise ValueError("a generation request needs at least one prompt token")


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives, as (token id, logprob); a
    prompt's first token has neither (nothing comes before it)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


class InexactMerge(AdapterError):
    """A merge this server would not keep exact for the other models (a 409): in a reduced precision the fold
    and its compensation round differently, so other models' greedy answers could change."""


def check_exact_merge(dtype: torch.dtype, batch_invariant: bool, allowed: bool) -> None:
    """Refuse a merge in a reduced precision unless the engine keeps it exact (--batch-invariant) or the
    operator accepted the difference (--allow-inexact-merge)."""
    if dtype != torch.float32 and not batch_invariant and not allowed:
        raise InexactMerge("name", f"merging in {str(dtype).removeprefix('torch.')} would change other models' "
                                   f"answers (the fold and its compensation round differently); serve with "
                                   f"--dtype float32 or --batch-invariant, or accept it with --allow-inexact-merge")


class ConstraintFailed(AdapterError):
    """A request's own output constraint failed in the engine (its mask took too long, or it leaves no token
    to choose): a 400 naming the field the constraint came from."""


@dataclass
class GenerationOutput:
    """One step of one request: the new text (possibly empty while a stop string is pending)."""

    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None
    queue_time: float | None = None  # seconds from arrival to first scheduled; set on the first output
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output, when the request asked for them
    # What ended a request the engine refused on the client's account (its adapter left, its adapter's virtual
    # tokens overflow the context): raised as that 4xx rather than the 500 of a generation failure.
    refusal: AdapterError | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class FailureWindow:
    """Engine failures within the last `window_s` seconds: an engine restarts after each, until too many."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._times: deque[float] = deque()

    def add(self) -> int:
        """Record a failure now; returns how many fall inside the window."""
        now = time.monotonic()
        self._times.append(now)
        while self._times[0] < now - self.window_s:
            self._times.popleft()
        return len(self._times)


class Engine(Protocol):
    """Each engine owns its adapters' residency: what is on the device, what waits for a slot, and when a
    replaced version's memory frees. The server only names versions (AdapterRef)."""

    max_model_len: int
    merged: str | None  # the LoRA folded into the base weights now: the engine owns this state
    failure: str | None  # why the engine can no longer serve (it died for good); None while it serves
    is_restarting: bool  # a failed engine is being replaced: requests get 503 + Retry-After meanwhile

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def read_adapter(self, folder: Path) -> "Adapter":
        """Parse and check the adapter in `folder` as this engine reads adapters (AdapterError if it cannot)."""
        ...

    def check_adapter(self, adapter: "Adapter") -> None:
        """Raise AdapterError when this engine cannot serve the adapter (before it is registered)."""
        ...

    def engine_for(self, kind: str) -> str:
        """The engine that serves adapters of `kind`: "torch" or "vllm"."""
        ...

    async def add_adapter(self, ref: "AdapterRef", adapter: "Adapter") -> None:
        """A version of `ref.name` is being registered (`adapter`, read from `ref.folder`): serve it to
        requests routed to it or to an older version from now on, loading it now where a slot is free.
        Called again once the registry commits it, with the version it got. Running requests keep theirs."""
        ...

    async def remove_adapter(self, name: str) -> None:
        """`name` was deleted: its versions leave once their running requests end."""
        ...

    def tier(self, ref: "AdapterRef") -> str:
        """Where `ref`'s version is now: "device", "host" (parsed in host memory) or "disk" (the store only)."""
        ...

    async def merge_adapter(self, ref: "AdapterRef") -> None:
        """Fold LoRA `ref` into the base weights (loading it first, unmerging any other); the base and every
        other adapter keep their exact outputs through compensating LoRAs."""
        ...

    async def unmerge_adapter(self) -> None:
        """Restore the base weights; a no-op when nothing is merged."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream outputs until one is finished, making the request's adapter resident first (it may wait
        for a slot); closing the iterator early aborts the request."""
        ...
