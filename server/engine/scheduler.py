"""Continuous batching: new requests are prefilled between decode steps, finished ones leave at once.

All methods run on the engine thread. `running[i]` lives in cache slot i, so every batch covers a
contiguous slot range: a prefill batch the newly admitted tail, a decode batch all of them.
"""

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from xgrammar import GrammarMatcher

from adapters.base import AdapterError
from adapters.prefix import PrefixAdapter
from adapters.prompt import PromptAdapter
from server.engine.adapter_bank import Resident
from server.engine.base import FinishReason, GenerationOutput, GenerationRequest, TokenLogprob
from server.engine.detokenizer import IncrementalText
from server.engine.model_runner import ModelRunner
from server.engine.sampler import apply_logit_changes, logprobs_of, make_generator, prompt_logprobs_of, sample
from server.metrics import ENGINE_BATCH_SIZE
from server.structured import mask_to_grammars, new_matcher

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    emit: Callable[[GenerationOutput], None]
    text: IncrementalText
    generator: torch.Generator | None
    matcher: GrammarMatcher | None  # structured outputs: where the sequence is in its grammar
    resident: Resident | None = None  # the adapter version this sequence runs with, held until it ends
    num_virtual: int = 0  # prefix/prompt-tuning positions before the prompt
    reserved_len: int = 0  # what the KV cache must hold: virtual + prompt + max_tokens, capped at the context
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    first_scheduled: float | None = None

    @property
    def length(self) -> int:
        return self.num_virtual + len(self.request.prompt_token_ids) + len(self.generated)

    def prefill(self) -> tuple[list[int], int]:
        """(tokens to feed, position of the first): soft-prompt rows ride along as negative ids,
        a prefix is already in the cache, so the prompt starts after it."""
        prompt = self.request.prompt_token_ids
        adapter = self.resident.adapter if self.resident is not None else None
        if isinstance(adapter, PromptAdapter):
            return [-1 - k for k in range(self.num_virtual)] + prompt, 0
        return prompt, self.num_virtual


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, *, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, kv_cache_bytes: int):
        self.runner, self.tokenizer = runner, tokenizer
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.max_num_batched_tokens, self.kv_cache_bytes = max_num_batched_tokens, kv_cache_bytes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def new_sequence(self, request: GenerationRequest, emit: Callable[[GenerationOutput], None]) -> Sequence:
        sampling = request.sampling
        return Sequence(request, emit, IncrementalText(self.tokenizer, sampling.stop),
                        make_generator(sampling, self.runner.device), new_matcher(request))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        request = seq.request
        try:
            if request.adapter is not None:
                seq.resident = self.runner.adapters.acquire(request.adapter)
                seq.num_virtual = seq.resident.adapter.num_virtual_tokens
            if seq.length >= self.max_model_len:
                raise AdapterError("messages", f"{seq.num_virtual} virtual + {len(request.prompt_token_ids)} prompt "
                                               f"tokens exceed the context of {self.max_model_len}")
        except Exception as exc:  # AdapterError, or anything unexpected: this request fails, not the engine
            self._finish(seq, GenerationOutput("", [], len(request.prompt_token_ids), 0, "error", str(exc)))
            return
        seq.reserved_len = min(seq.length + request.sampling.max_tokens, self.max_model_len)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        for seq in [s for s in self.waiting if s.request.request_id == request_id]:
            self.waiting.remove(seq)
            self._drop_adapter(seq)
        for seq in self.running:
            if seq.request.request_id == request_id:
                self._release(seq)
                return

    def abort_all(self, finish_reason: FinishReason, message: str) -> None:
        """End every request, e.g. at shutdown ("abort") or after an unexpected engine failure ("error")."""
        for seq in [*self.waiting, *self.running]:
            self._finish(seq, GenerationOutput("", [], len(seq.request.prompt_token_ids), len(seq.generated),
                                               finish_reason, message))
        self.waiting.clear()
        self.running.clear()

    def step(self) -> None:
        batch, phase, inputs, starts = self._schedule()
        if not batch:
            return
        ENGINE_BATCH_SIZE.labels(phase=phase).observe(len(batch))
        params = [s.request.sampling for s in batch]
        scored = tuple(i for i, p in enumerate(params) if phase == "prefill" and p.prompt_logprobs is not None)
        try:
            logits, full = self.runner.forward_scoring(batch[0].slot, inputs, starts, [s.resident for s in batch],
                                                       scored)
            changed = apply_logit_changes(logits, params, [(s.request.prompt_token_ids, s.generated) for s in batch],
                                          self.runner.eos_token_ids)
            changed = mask_to_grammars(changed, [s.matcher for s in batch])
            tokens = sample(changed, params, [s.generator for s in batch])
            logprobs = logprobs_of(logits, tokens, params)
        except Exception as exc:  # a failed batch fails its own requests, never the engine
            log.exception("%s step failed for %d sequences", phase, len(batch))
            self._finish_all(batch, [self._failure(s, f"generation failed: {exc}") for s in batch])
            return
        self._finish_all(batch, [self._advance(s, tokens[i], logprobs[i], full.get(i)) for i, s in enumerate(batch)])

    def _schedule(self) -> tuple[list[Sequence], str, list[list[int]], list[int]]:
        admitted = self._admit()
        if admitted:
            inputs, starts = zip(*(s.prefill() for s in admitted))
            return admitted, "prefill", list(inputs), list(starts)
        batch = self.running
        return batch, "decode", [[s.generated[-1]] for s in batch], [s.length - 1 for s in batch]

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots while the prefill and KV-cache budgets allow.

        All or nothing: the cache grows before any sequence leaves the queue, and if it cannot grow the
        sequences it was for are answered with an error; none is left in no queue holding its adapter."""
        chosen = self._choose_admissions()
        if not chosen:
            return []
        new = [self.waiting.popleft() for _ in range(len(chosen))]
        try:
            self.runner.cache.ensure(len(self.running) + len(new), max(s.reserved_len for s in self.running + new))
        except Exception as exc:  # e.g. out of memory: these requests fail, the running ones go on
            log.exception("the KV cache could not grow for %d new sequences", len(new))
            for seq in new:
                self._finish(seq, self._failure(seq, f"no KV-cache memory for this request ({exc})"))
            return []
        now = time.monotonic()
        for seq in new:
            seq.slot, seq.first_scheduled = len(self.running), now
            self.running.append(seq)
            if seq.resident is not None and isinstance(seq.resident.adapter, PrefixAdapter):
                self.runner.write_prefix(seq.slot, seq.resident.adapter)
        return new

    def _choose_admissions(self) -> list[Sequence]:
        """The head of the queue that fits the free slots and the prefill and KV-cache budgets."""
        chosen: list[Sequence] = []
        reserve = max((s.reserved_len for s in self.running), default=0)
        width = 0
        for seq in self.waiting:
            if len(self.running) + len(chosen) >= self.max_num_seqs:
                break
            next_width = max(width, len(seq.prefill()[0]))
            next_reserve = max(reserve, seq.reserved_len)
            num_slots = len(self.running) + len(chosen) + 1
            over_tokens = next_width * (len(chosen) + 1) > self.max_num_batched_tokens
            over_memory = self.runner.cache.bytes_needed(num_slots, next_reserve) > self.kv_cache_bytes
            # A lone sequence always runs, whatever the budgets, so nothing waits forever.
            if num_slots > 1 and (over_tokens or over_memory):
                break
            chosen.append(seq)
            width, reserve = next_width, next_reserve
        return chosen

    def _advance(self, seq: Sequence, token: int | None, logprob: TokenLogprob | None,
                 prompt_logits: torch.Tensor | None) -> GenerationOutput:
        """The row's output for this step; `prompt_logits`: its logits at every input position (prefill of a
        request that asked for prompt logprobs)."""
        if token is None:
            return self._failure(seq, "generation failed: the model produced non-finite logits for this request")
        sampling, prompt = seq.request.sampling, seq.request.prompt_token_ids
        try:  # everything here is this row's own: a failure fails it, not the batch
            prompt_logprobs = (prompt_logprobs_of(prompt_logits, prompt, sampling.prompt_logprobs)
                               if prompt_logits is not None else None)
            if sampling.max_tokens == 0:  # scoring only: the prompt's logprobs, no token
                return GenerationOutput("", [], len(prompt), 0, "length", prompt_logprobs=prompt_logprobs,
                                        queue_time=seq.first_scheduled - seq.request.arrival_time)
            out = self._next_output(seq, token)
            out.logprobs = [logprob] if logprob is not None else None
            out.prompt_logprobs = prompt_logprobs
            return out
        except Exception as exc:  # detokenizing or stop strings: this row fails, not the batch
            log.exception("output processing failed for one sequence")
            return self._failure(seq, f"generation failed: {exc}")

    def _next_output(self, seq: Sequence, token: int) -> GenerationOutput:
        seq.generated.append(token)
        sampling = seq.request.sampling
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise ValueError(f"token {token} breaks the output's grammar")
        if ((token in self.runner.eos_token_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids
                or (seq.matcher is not None and seq.matcher.is_terminated())):
            text, reason = seq.text.flush(), "stop"
        else:
            text, stopped = seq.text.add(token)
            reason = "stop" if stopped else None
            if reason is None and (len(seq.generated) >= sampling.max_tokens
                                   or seq.length >= self.max_model_len):
                text, reason = text + seq.text.flush(), "length"
        queue_time = seq.first_scheduled - seq.request.arrival_time if len(seq.generated) == 1 else None
        return GenerationOutput(text, [token], len(seq.request.prompt_token_ids), len(seq.generated), reason,
                                queue_time=queue_time)

    @staticmethod
    def _failure(seq: Sequence, message: str) -> GenerationOutput:
        return GenerationOutput("", [], len(seq.request.prompt_token_ids), len(seq.generated), "error", message)

    def _finish(self, seq: Sequence, out: GenerationOutput) -> None:
        """Emit a final output for a sequence that is in no batch."""
        seq.emit(out)
        self._drop_adapter(seq)

    def _drop_adapter(self, seq: Sequence) -> None:
        if seq.resident is not None:
            self.runner.adapters.release(seq.resident)
            seq.resident = None

    def _finish_all(self, batch: list[Sequence], outputs: list[GenerationOutput]) -> None:
        for seq, out in zip(batch, outputs):
            seq.emit(out)
        # Highest slot first, so a sequence moved down into a freed slot is never one still to release.
        for seq, out in sorted(zip(batch, outputs), key=lambda pair: -pair[0].slot):
            if out.finish_reason == "error":  # its keys/values may be non-finite: other rows read masked slots
                self.runner.cache.clear(seq.slot)
            if out.is_finished:
                self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free `seq`'s slot by moving the last running sequence into it, keeping slots contiguous."""
        self._drop_adapter(seq)
        last = self.running.pop()
        if last is not seq:
            self.runner.cache.move(last.slot, seq.slot, last.length)
            last.slot = seq.slot
            self.running[seq.slot] = last
