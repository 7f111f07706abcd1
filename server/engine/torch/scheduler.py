"""Continuous batching: what each engine step runs. New requests are prefilled between decode steps,
finished ones leave at once.

All methods run on the engine thread. Each running sequence holds the KV-cache blocks of its tokens and
takes one more when its last block is full. When none is left, the newest running sequences are preempted:
their blocks are freed, and they go back to the head of the queue and are recomputed from their tokens
(prompt and what they generated so far) when blocks free up, so nothing is lost or sent twice.

Prefix caching: an admitted sequence takes the cached blocks of the longest prefix it shares with what
earlier sequences of the same adapter version computed, and computes only the rest. Chunked prefill: a
step feeds at most `max_num_batched_tokens`, so a long prompt delays the running streams by one chunk at a
time, not by its whole prefill. Where the model runner packs rows (`mixed_steps`: vLLM's CPU attention
kernel), the chunks ride in the decode steps, as in vLLM v1; elsewhere prefill and decode steps alternate
while both have work.
"""

import logging
import time
from collections import deque

from adapters.base import AdapterError
from server.engine.base import FinishReason, GenerationOutput
from server.engine.torch.kv_cache import KVCacheFull, block_hashes
from server.engine.torch.model_runner import ModelRunner
from server.engine.torch.sequence import SampledBatch, ScheduledBatch, Sequence
from server.engine.torch.residency import TorchResidency
from server.metrics import (ADAPTER_QUEUE, ADAPTER_WAIT_TIME, ENGINE_BATCH_SIZE, PREEMPTIONS, PREFIX_CACHE_HITS,
                            PREFIX_CACHE_QUERIES)

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner: ModelRunner, residency: TorchResidency, *, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True):
        self.runner = runner  # its KV cache and adapter bank: the step's model work is the engine core's call
        self.residency = residency
        self._num_waiting_for_adapters = 0  # queued sequences whose adapter is not resident yet
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._decoded_last = False  # prefill and decode steps take turns while both have work

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        request = seq.request
        if request.adapter is not None:
            seq.num_virtual = request.adapter.num_virtual_tokens  # as routed; checked again once it is resident
        if not self._fits_context(seq):
            return
        self.waiting.append(seq)

    def _fits_context(self, seq: Sequence) -> bool:
        """False (the sequence refused) where its adapter's virtual tokens and its prompt overflow the context."""
        if seq.length < self.max_model_len:
            return True
        refusal = AdapterError("messages", f"{seq.num_virtual} virtual + {len(seq.request.prompt_token_ids)} "
                                           f"prompt tokens exceed the context of {self.max_model_len}")
        self._finish(seq, seq.failure(str(refusal), refusal))
        return False

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

    def schedule(self) -> ScheduledBatch | None:
        """The next step: waiting sequences admitted while the budgets allow, then, where the runner mixes
        steps, every decode row with prefill chunks in the rest of the token budget; elsewhere a prefill
        chunk or a decode step (they take turns while both have work). None when nothing can run."""
        self._admit()
        prefilling = [s for s in self.running if s.length - s.computed > 1]
        # Mixed while the decode rows leave some of the budget to the chunks; else they take turns, so that
        # prefill goes on however many streams decode.
        decoding = len(self.running) - len(prefilling)
        if self.runner.mixed_steps and prefilling and 0 < decoding < self.max_num_batched_tokens:
            scheduled = self._mixed()
        else:
            decode = not prefilling or (not self._decoded_last and len(prefilling) < len(self.running))
            self._decoded_last = decode
            scheduled = self._decode() if decode else self._chunk(prefilling)
        if not scheduled.sequences:
            return None
        ENGINE_BATCH_SIZE.labels(phase=scheduled.phase).observe(len(scheduled.sequences))
        return scheduled

    def _decode(self) -> ScheduledBatch:
        self._make_room_for_decode()
        # A list of its own: finished sequences leave `running` while the batch is walked.
        batch = [s for s in self.running if s.length - s.computed == 1]
        return ScheduledBatch("decode", batch, [s.tokens()[s.computed :] for s in batch])

    def _mixed(self) -> ScheduledBatch:
        """vLLM v1's step: each decoding sequence's next token, then prefill chunks in order while the token
        budget lasts (the last one cut to it), one step instead of a decode and a prefill step in turn."""
        decode = self._decode()
        if not decode.sequences:  # making room preempted every decoding sequence
            return self._chunk([s for s in self.running if s.length - s.computed > 1])
        batch, inputs = list(decode.sequences), list(decode.inputs)
        budget = self.max_num_batched_tokens - len(batch)
        for seq in self.running:  # after the decode rows' blocks: making room may have preempted some
            pending = seq.length - seq.computed
            if pending > 1 and budget > 0:
                take = min(pending, budget)
                batch.append(seq)
                inputs.append(seq.tokens()[seq.computed : seq.computed + take])
                budget -= take
        if len(batch) == len(decode.sequences):  # no chunk fits beside the decode rows
            return decode
        return ScheduledBatch("mixed", batch, inputs)

    def update(self, batch: ScheduledBatch, sampled: SampledBatch) -> None:
        """After the forward pass: what each row fed is computed, its full blocks go to the prefix cache and
        prompt-logprob rows keep their chunk's logits."""
        for i, (seq, fed) in enumerate(zip(batch.sequences, batch.inputs)):
            seq.computed += len(fed)
            self._publish(seq)
            if i in sampled.prompt_logits:
                seq.prompt_logits.append(sampled.prompt_logits[i])

    def _chunk(self, prefilling: list[Sequence]) -> ScheduledBatch:
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
        return ScheduledBatch("prefill", batch, inputs)

    def _admit(self) -> None:
        """Move waiting sequences into the running set, in order, while the sequence, prefill and KV-cache
        budgets allow; each takes the cached blocks of its prefix and new ones for the rest. A sequence whose
        adapter cannot be resident yet (read under way, no slot free) is skipped and keeps its place. If the
        pool cannot grow (out of memory) the sequences it was for are answered with an error; none is left in
        no queue holding its adapter."""
        now = time.monotonic()
        cache = self.runner.cache
        backlog = sum(s.length - s.computed for s in self.running if s.length - s.computed > 1)
        for seq in list(self.waiting):
            num_running = len(self.running)
            # With a block kept per running sequence for its next decode step (else admitting one preempts
            # another); with cached blocks it takes fewer. A lone sequence always runs (the pool holds one of
            # the whole context), so nothing waits forever.
            over_memory = cache.blocks_for(seq.length) + num_running > cache.num_free
            if num_running >= self.max_num_seqs or backlog >= self.max_num_batched_tokens or (
                    num_running > 0 and over_memory):
                break
            if not self._claim_adapter(seq, now):
                continue
            try:
                self._take_blocks(seq)
            except KVCacheFull:  # its prefix was evicted by an earlier admission: it waits for the next step
                break
            except Exception as exc:  # e.g. out of memory: this request fails, the running ones go on
                log.exception("the KV cache could not grow for a new sequence")
                self.waiting.remove(seq)
                self._finish(seq, seq.failure(f"no KV-cache memory for this request ({exc})"))
                continue
            self.waiting.remove(seq)
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            self.running.append(seq)
            backlog += seq.length
        # Every queued sequence without its adapter, also those behind where admission stopped: their reads
        # stay asked, and the wait that makes a busy adapter drain goes on.
        waiting = [seq.request.adapter.key for seq in self.waiting if seq.resident is None and seq.request.adapter]
        ADAPTER_QUEUE.inc(len(waiting) - self._num_waiting_for_adapters)  # inc: a vLLM engine beside it counts too
        self._num_waiting_for_adapters = len(waiting)
        self.residency.settle(set(waiting))

    def _claim_adapter(self, seq: Sequence, now: float) -> bool:
        """Hold the sequence's adapter version; False while it must wait for it (or it was refused)."""
        ref = seq.request.adapter
        if ref is None or seq.resident is not None:
            return True
        try:
            seq.resident = self.residency.claim(ref)
        except Exception as exc:  # AdapterError, or e.g. out of memory placing it: this request fails alone
            if not isinstance(exc, AdapterError):
                log.exception("placing adapter %s failed", ref.name)
            self.waiting.remove(seq)
            self._finish(seq, seq.failure(f"adapter `{ref.name}` could not be loaded: {exc}",
                                          exc if isinstance(exc, AdapterError) else None))
            return False
        if seq.resident is None:
            seq.adapter_wait_start = seq.adapter_wait_start or now
            return False
        if seq.adapter_wait_start is not None:
            ADAPTER_WAIT_TIME.labels(ref.name).observe(now - seq.adapter_wait_start)
        seq.num_virtual = seq.resident.adapter.num_virtual_tokens  # a newer version may have others
        if not self._fits_context(seq):
            self.waiting.remove(seq)
            return False
        return True

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
        if seq.resident is not None and seq.computed < seq.num_virtual and \
                self.runner.adapters.admit(seq.resident, seq.blocks, cache):  # a prefix's keys/values, written
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
                    seq.emit(seq.failure(f"no KV-cache memory for this request ({exc})"))
                    self._release(seq, failed=True)

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and requeue it first; it keeps its adapter and what it generated."""
        self.running.remove(seq)
        self.runner.cache.free(seq.blocks)
        seq.blocks, seq.computed, seq.prompt_logits = [], 0, []
        self.waiting.appendleft(seq)
        PREEMPTIONS.inc()

    def _finish(self, seq: Sequence, out: GenerationOutput) -> None:
        """Emit a final output for a sequence that is in no batch."""
        seq.emit(out)
        self._drop_adapter(seq)

    def _drop_adapter(self, seq: Sequence) -> None:
        if seq.resident is not None:
            self.runner.adapters.release(seq.resident)
            seq.resident = None

    def finish(self, batch: list[Sequence], outputs: list[GenerationOutput]) -> None:
        """Send each sequence its output; finished ones leave and free their adapter and blocks."""
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
