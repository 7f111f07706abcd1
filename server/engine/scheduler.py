"""Continuous batching: new requests are prefilled between decode steps, finished ones leave at once.

All methods run on the engine thread. Each running sequence holds the KV-cache blocks of its tokens and
takes one more when its last block is full. When none is left, the newest running sequences are preempted:
their blocks are freed, and they go back to the head of the queue and are recomputed from their tokens
(prompt and what they generated so far) when blocks free up, so nothing is lost or sent twice.

Prefix caching: an admitted sequence takes the cached blocks of the longest prefix it shares with what
earlier sequences of the same adapter version computed, and computes only the rest. Chunked prefill: a
prefill step feeds at most `max_num_batched_tokens`, and prefill and decode steps alternate while both
have work, so a long prompt delays the running streams by one chunk at a time, not by its whole prefill.
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
from server.engine.adapter_bank import Resident
from server.engine.base import FinishReason, GenerationOutput, GenerationRequest, TokenLogprob
from server.engine.detokenizer import IncrementalText
from server.engine.kv_cache import KVCacheFull, block_hashes
from server.engine.model_runner import ModelRunner
from server.engine.sampler import apply_logit_changes, logprobs_of, make_generator, prompt_logprobs_of, sample
from server.metrics import ENGINE_BATCH_SIZE, KV_CACHE_BLOCKS, PREEMPTIONS, PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES
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
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # its KV-cache block table; empty while waiting
    computed: int = 0  # positions whose keys and values are in its blocks
    root: bytes = b""  # its adapter and base weights' versions at admission: the first block's hash key
    hashes: list[bytes] = field(default_factory=list)  # of its full blocks, as far as they are known
    published: int = 0  # leading blocks offered to the prefix cache
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # prompt logprobs: the chunks' logits so far
    first_scheduled: float | None = None

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


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, *, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool = True):
        self.runner, self.tokenizer = runner, tokenizer
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._decoded_last = False  # prefill and decode steps take turns while both have work

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
            self.runner.cache.free(seq.blocks)  # the caller zeroes the pool when a failure may have spoilt it
        self.waiting.clear()
        self.running.clear()

    def step(self) -> None:
        try:
            self._step()
        finally:
            cache = self.runner.cache
            KV_CACHE_BLOCKS.labels("used").set(cache.num_used)
            KV_CACHE_BLOCKS.labels("cached").set(cache.num_cached)
            KV_CACHE_BLOCKS.labels("free").set(cache.num_free - cache.num_cached)

    def _step(self) -> None:
        batch, phase, inputs = self._schedule()
        if not batch:
            return
        ENGINE_BATCH_SIZE.labels(phase=phase).observe(len(batch))
        scored = tuple(i for i, s in enumerate(batch) if s.is_scoring_prompt)
        try:
            logits, full = self.runner.forward_scoring([s.blocks for s in batch], inputs, [s.computed for s in batch],
                                                       [s.resident for s in batch], scored)
            for i, (seq, fed) in enumerate(zip(batch, inputs)):
                seq.computed += len(fed)
                self._publish(seq)
                if i in full:
                    seq.prompt_logits.append(full[i])
            # Rows whose prefill ends in a later chunk get no token yet (nor draw from their generator).
            ready = [i for i, s in enumerate(batch) if s.computed == s.length]
            if not ready:
                return
            batch, logits = [batch[i] for i in ready], logits[ready]
            params = [s.request.sampling for s in batch]
            changed = apply_logit_changes(logits, params, [(s.request.prompt_token_ids, s.generated) for s in batch],
                                          self.runner.eos_token_ids)
            changed = mask_to_grammars(changed, [s.matcher for s in batch])
            tokens = sample(changed, params, [s.generator for s in batch])
            logprobs = logprobs_of(logits, tokens, params)
        except Exception as exc:  # a failed batch fails its own requests, never the engine
            log.exception("%s step failed for %d sequences", phase, len(batch))
            self._finish_all(batch, [self._failure(s, f"generation failed: {exc}") for s in batch])
            return
        self._finish_all(batch, [self._advance(s, tokens[i], logprobs[i]) for i, s in enumerate(batch)])

    def _schedule(self) -> tuple[list[Sequence], str, list[list[int]]]:
        """The next step's rows, its phase and each row's input tokens (fed from its `computed` position)."""
        self._admit()
        prefilling = [s for s in self.running if s.length - s.computed > 1]
        decode = not prefilling or (not self._decoded_last and len(prefilling) < len(self.running))
        self._decoded_last = decode
        if not decode:
            return self._chunk(prefilling)
        self._make_room_for_decode()
        # A list of its own: finished sequences leave `running` while the batch is walked.
        batch = [s for s in self.running if s.length - s.computed == 1]
        return batch, "decode", [s.tokens()[s.computed :] for s in batch]

    def _chunk(self, prefilling: list[Sequence]) -> tuple[list[Sequence], str, list[list[int]]]:
        """Prefilling sequences in order while their padded batch fits the step's token budget; the first
        one is cut to the budget if longer, the others join only whole."""
        batch: list[Sequence] = []
        inputs: list[list[int]] = []
        width = 0
        for seq in prefilling:
            pending = seq.length - seq.computed
            if batch and max(width, pending) * (len(batch) + 1) > self.max_num_batched_tokens:
                break
            take = min(pending, self.max_num_batched_tokens)
            batch.append(seq)
            inputs.append(seq.tokens()[seq.computed : seq.computed + take])
            width = max(width, take)
        return batch, "prefill", inputs

    def _admit(self) -> None:
        """Move waiting sequences into the running set while the sequence, prefill and KV-cache budgets
        allow; each takes the cached blocks of its prefix and new ones for the rest. If the pool cannot grow
        (out of memory) the sequences it was for are answered with an error; none is left in no queue
        holding its adapter."""
        now = time.monotonic()
        for _ in range(self._count_admissions()):
            seq = self.waiting.popleft()
            try:
                self._take_blocks(seq)
            except KVCacheFull:  # its prefix was evicted by an earlier admission: it waits for the next step
                self.waiting.appendleft(seq)
                break
            except Exception as exc:  # e.g. out of memory: this request fails, the running ones go on
                log.exception("the KV cache could not grow for a new sequence")
                self._finish(seq, self._failure(seq, f"no KV-cache memory for this request ({exc})"))
                continue
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            self.running.append(seq)

    def _take_blocks(self, seq: Sequence) -> None:
        """Its blocks: the cached ones of its longest cached prefix (leaving at least one token to compute,
        which gives its first logits), then new ones. A prefix adapter's keys and values are written."""
        cache, tokens = self.runner.cache, seq.tokens()
        seq.hashes = []
        reused: list[int] = []
        if self.enable_prefix_caching:
            seq.root = self.runner.adapters.cache_root(seq.resident, seq.request.cache_salt)
            seq.hashes = block_hashes(seq.root, tokens, cache.block_size, [])
            if not seq.is_scoring_prompt:  # those need the logits of every prompt position
                reused = cache.lookup(seq.hashes[: (len(tokens) - 1) // cache.block_size])
            PREFIX_CACHE_QUERIES.inc(len(tokens))
            PREFIX_CACHE_HITS.inc(len(reused) * cache.block_size)
        cache.share(reused)  # held first, so that the allocation cannot evict them
        try:
            seq.blocks = reused + cache.allocate(cache.blocks_for(len(tokens)) - len(reused))
        except Exception:
            cache.free(reused)
            raise
        seq.computed, seq.published = len(reused) * cache.block_size, len(reused)
        adapter = seq.resident.adapter if seq.resident is not None else None
        if isinstance(adapter, PrefixAdapter) and seq.computed < seq.num_virtual:
            self.runner.write_prefix(seq.blocks, adapter)
            seq.computed = seq.num_virtual

    def _publish(self, seq: Sequence) -> None:
        """Offer the sequence's newly full blocks to the prefix cache."""
        full = seq.computed // self.runner.cache.block_size
        if not self.enable_prefix_caching or full <= seq.published:
            return
        if len(seq.hashes) < full:
            seq.hashes = block_hashes(seq.root, seq.tokens(), self.runner.cache.block_size, seq.hashes)
        for block, digest in zip(seq.blocks[seq.published : full], seq.hashes[seq.published : full]):
            self.runner.cache.publish(block, digest)
        seq.published = full

    def _count_admissions(self) -> int:
        """How many at the head of the queue fit the free sequences, the prefill backlog (tokens admitted
        but not prefilled yet: under one step's budget, whatever the last one's length) and the free blocks,
        keeping a block per running sequence for its next decode step (else admitting one preempts another)."""
        count = blocks = 0
        cache = self.runner.cache
        backlog = sum(s.length - s.computed for s in self.running if s.length - s.computed > 1)
        for seq in self.waiting:
            num_running = len(self.running) + count
            blocks += cache.blocks_for(seq.length)  # with cached blocks it takes fewer: at most this many
            over_memory = blocks + num_running > cache.num_free
            # A lone sequence always runs (the pool holds one of the whole context), so nothing waits forever.
            if num_running >= self.max_num_seqs or backlog >= self.max_num_batched_tokens or (
                    num_running > 0 and over_memory):
                break
            count, backlog = count + 1, backlog + seq.length
        return count

    def _make_room_for_decode(self) -> None:
        """Give each running sequence a block for the token it feeds next, preempting the newest ones (their
        blocks go back to the pool) while the pool has none."""
        cache = self.runner.cache
        for seq in list(self.running):
            while seq in self.running and len(seq.blocks) < cache.blocks_for(seq.length):
                try:
                    seq.blocks += cache.allocate(1)
                except KVCacheFull:
                    self._preempt(self.running[-1])
                except Exception as exc:  # e.g. out of memory growing the pool: this request fails
                    log.exception("the KV cache could not grow for a running sequence")
                    seq.emit(self._failure(seq, f"no KV-cache memory for this request ({exc})"))
                    self._release(seq, failed=True)

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and requeue it first; it keeps its adapter and what it generated."""
        self.running.remove(seq)
        self.runner.cache.free(seq.blocks)
        seq.blocks, seq.computed, seq.prompt_logits = [], 0, []
        self.waiting.appendleft(seq)
        PREEMPTIONS.inc()

    def _advance(self, seq: Sequence, token: int | None, logprob: TokenLogprob | None) -> GenerationOutput:
        """The row's output for this step (with its prompt logprobs at the end of a prefill that asked)."""
        if token is None:
            return self._failure(seq, "generation failed: the model produced non-finite logits for this request")
        sampling, prompt = seq.request.sampling, seq.request.prompt_token_ids
        try:  # everything here is this row's own: a failure fails it, not the batch
            prompt_logprobs = None
            if seq.prompt_logits:  # logits at every input position of its prefill, chunk by chunk
                prompt_logprobs = prompt_logprobs_of(torch.cat(seq.prompt_logits), prompt, sampling.prompt_logprobs)
                seq.prompt_logits = []
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
            if out.is_finished:
                self._release(seq, failed=out.finish_reason == "error")

    def _release(self, seq: Sequence, *, failed: bool = False) -> None:
        """`failed`: its keys/values may be non-finite, so its blocks are zeroed before others get them."""
        self.running.remove(seq)
        self._drop_adapter(seq)
        self.runner.cache.free(seq.blocks, clear=failed)
        seq.blocks = []
