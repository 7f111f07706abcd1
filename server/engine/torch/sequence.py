"""A request's state inside the torch engine, and what one engine step hands from the scheduler to the
model runner and from the model runner to the output processor."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from xgrammar import GrammarMatcher

from adapters.base import AdapterError
from server.engine.torch.adapter_bank import Resident
from server.engine.base import GenerationOutput, GenerationRequest, TokenLogprob
from server.engine.torch.detokenizer import IncrementalText


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    emit: Callable[[GenerationOutput], None]
    text: IncrementalText
    generator: torch.Generator | None
    matcher: GrammarMatcher | None  # structured outputs: where the sequence is in its grammar
    resident: Resident | None = None  # the adapter version this sequence runs with, held until it ends
    num_virtual: int = 0  # prefix/prompt-tuning positions before the prompt
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # its KV-cache block table; empty while waiting
    computed: int = 0  # positions whose keys and values are in its blocks
    root: bytes = b""  # its adapter and base weights' versions at admission: the first block's hash key
    hashes: list[bytes] = field(default_factory=list)  # of its full blocks, as far as they are known
    published: int = 0  # leading blocks offered to the prefix cache
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # prompt logprobs: the chunks' logits so far
    first_scheduled: float | None = None
    adapter_wait_start: float | None = None  # when it first waited for its adapter to become resident
    constraint_failure: str | None = None  # why its grammar mask failed (it then fails alone, a 400)

    @property
    def length(self) -> int:
        return self.num_virtual + len(self.request.prompt_token_ids) + len(self.generated)

    @property
    def is_scoring_prompt(self) -> bool:
        """Its prefill must produce every prompt position's logits (prompt logprobs, not sent yet)."""
        return self.request.sampling.prompt_logprobs is not None and not self.generated

    def tokens(self) -> list[int]:
        """What each cache position holds: a prefix or soft prompt's virtual positions (negative ids, -k-1
        for row k: a soft prompt's rows ride into the model as these), the prompt, the generated tokens."""
        virtual = [-1 - k for k in range(self.num_virtual)]
        return virtual + self.request.prompt_token_ids + self.generated

    def failure(self, message: str, refusal: AdapterError | None = None) -> GenerationOutput:
        """The final output of a request that failed with `message` (or that `refusal` refused)."""
        return GenerationOutput("", [], len(self.request.prompt_token_ids), len(self.generated), "error", message,
                                refusal=refusal)


@dataclass
class ScheduledBatch:
    """One step as the scheduler decided it: its rows, and the tokens each feeds from its `computed`
    position. Rows whose prompt this step completes are sampled; a prefill chunk with more to come is not.
    A mixed step holds decode rows and prefill chunks (the model runner packs it, one token a row)."""

    phase: Literal["prefill", "decode", "mixed"]
    sequences: list[Sequence]
    inputs: list[list[int]]

    @property
    def sampled_rows(self) -> list[int]:
        return [i for i, (seq, fed) in enumerate(zip(self.sequences, self.inputs))
                if seq.computed + len(fed) == seq.length]


@dataclass
class SampledBatch:
    """What the model runner computed for a ScheduledBatch."""

    rows: list[int]  # the batch's sampled rows, in order
    tokens: list[int | None]  # per sampled row; None: that row could not be sampled (non-finite logits)
    logprobs: list[TokenLogprob | None]  # per sampled row, for those that asked
    prompt_logits: dict[int, torch.Tensor]  # batch row -> logits at each position it fed (prompt logprobs)
