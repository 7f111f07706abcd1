"""Continuous batching: what each engine step runs. New requests are prefilled between decode steps,
finished ones leave at once.

All methods run on the engine thread. Each running sequence holds the KV-cache blocks of its tokens and
takes one more when its last block is full. When none is left, the newest running sequences are preempted:
their blocks are freed, and they go back to the head of the queue and are recomputed from their tokens
(prompt and what they generated so far) when blocks free up, so nothing is lost or sent twice.

Fair queuing: tenants (API keys' tenants) are served by weighted fair queuing over the tokens each step
feeds, and within a tenant its adapters likewise: the next sequence admitted, and the first prefill chunk
of a step, is the one whose tenant (then adapter) has been served least for its weight, and a tenant below
its weighted share of the --max-num-seqs slots takes one from the tenant furthest over its share
(preempted, recomputed later). A tenant with --max-num-batched-tokens of prompt still to prefill admits
no more, leaving the others theirs. While two or more tenants share the engine (or did within
FAIR_WINDOW_S), a step's prefill chunks are capped to an eighth of the budget, so that a tenant's long
prompt holds another's first token up by a short step, not a long one.

Prefix caching: an admitted sequence takes the cached blocks of the longest prefix it shares with what
earlier sequences of the same adapter version computed, and computes only the rest. Chunked prefill: a
step feeds at most `max_num_batched_tokens`, so a long prompt delays the running streams by one chunk at a
time, not by its whole prefill. Where the model runner packs rows (`mixed_steps`: vLLM's CPU attention
kernel), the chunks ride in the decode steps, as in vLLM v1; elsewhere prefill and decode steps alternate
while both have work.
"""

import collections
import logging
import time
from collections import deque
from itertools import chain

from adapters.base import AdapterError
from server.engine.base import FinishReason, GenerationOutput
from server.engine.torch.kv_cache import KVCacheFull, block_hashes
from server.engine.torch.model_runner import ModelRunner
from server.engine.torch.sequence import SampledBatch, ScheduledBatch, Sequence
from server.engine.torch.residency import TorchResidency
from server.metrics import (ADAPTER_QUEUE, ADAPTER_WAIT_TIME, ENGINE_BATCH_SIZE, PREEMPTIONS, PREFIX_CACHE_HITS,
                            PREFIX_CACHE_QUERIES)

log = logging.getLogger(__name__)

FAIR_WINDOW_S = 10.0  # a tenant keeps the steps short for this long after its last sequence left
SHARED_BUDGET_DIVISOR = 8


def _flow(seq: Sequence) -> tuple[str, str]:
    """The fair queue's inner flow: a tenant's requests of one adapter (or of the base model, "")."""
    return seq.request.tenant, seq.request.adapter.name if seq.request.adapter is not None else ""


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
        # Fair queuing: tokens fed per tenant (over its weight) and per (tenant, adapter) flow, for those with
        # sequences here; one that arrives starts level with the least served, so idle time earns no credit.
        self._served: dict[str, float] = {}
        self._flow_served: dict[tuple[str, str], float] = {}
        self._last_seen: dict[str, float] = {}  # tenant -> when it last had a sequence here

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
        budget = self._track_tenants()
        self._admit()
        prefilling = sorted((s for s in self.running if s.length - s.computed > 1), key=self._turn)
        # Mixed while the decode rows leave some of the budget to the chunks; else they take turns, so that
        # prefill goes on however many streams decode.
        decoding = len(self.running) - len(prefilling)
        if self.runner.mixed_steps and prefilling and 0 < decoding < budget:
            scheduled = self._mixed(budget)
        else:
            decode = not prefilling or (not self._decoded_last and len(prefilling) < len(self.running))
            self._decoded_last = decode
            scheduled = self._decode() if decode else self._chunk(prefilling, budget)
        if not scheduled.sequences:
            return None
        ENGINE_BATCH_SIZE.labels(phase=scheduled.phase).observe(len(scheduled.sequences))
        return scheduled

    def _track_tenants(self) -> int:
        """Start tenants (and flows) new to the engine level with the least served, forget those gone; the
        step's token budget: short while several tenants share the engine."""
        now = time.monotonic()
        here = list(chain(self.waiting, self.running))
        tenants, flows = {s.request.tenant for s in here}, set(map(_flow, here))
        for served, keys in ((self._served, tenants), (self._flow_served, flows)):
            for gone in served.keys() - keys:
                del served[gone]
        floor = min(self._served.values(), default=0.0)
        for tenant in tenants - self._served.keys():
            self._served[tenant] = floor
        for flow in flows - self._flow_served.keys():  # level with its own tenant's least served adapter
            self._flow_served[flow] = min((v for (t, _), v in self._flow_served.items() if t == flow[0]), default=0.0)
        for tenant in self._served:
            self._last_seen[tenant] = now
        self._last_seen = {t: seen for t, seen in self._last_seen.items() if now - seen < FAIR_WINDOW_S}
        if len(self._last_seen) > 1:
            return max(1, self.max_num_batched_tokens // SHARED_BUDGET_DIVISOR)
        return self.max_num_batched_tokens

    def _turn(self, seq: Sequence) -> tuple[float, float, float]:
        """Fair-queue order: least served tenant, then its least served adapter, then first come."""
        return self._served[seq.request.tenant], self._flow_served[_flow(seq)], seq.request.arrival_time

    def _decode(self) -> ScheduledBatch:
        self._make_room_for_decode()
        # A list of its own: finished sequences leave `running` while the batch is walked.
        batch = [s for s in self.running if s.length - s.computed == 1]
        return ScheduledBatch("decode", batch, [s.tokens()[s.computed :] for s in batch])

    def _mixed(self, budget: int) -> ScheduledBatch:
        """vLLM v1's step: each decoding sequence's next token, then prefill chunks in fair order while the
        token budget lasts (the last one cut to it), one step instead of a decode and a prefill step in turn."""
        decode = self._decode()
        # After the decode rows' blocks: making room may have preempted some.
        prefilling = sorted((s for s in self.running if s.length - s.computed > 1), key=self._turn)
        if not decode.sequences:  # making room preempted every decoding sequence
            return self._chunk(prefilling, budget)
        batch, inputs = list(decode.sequences), list(decode.inputs)
        budget -= len(batch)
        for seq in prefilling:
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
            self._served[seq.request.tenant] += len(fed) / seq.request.weight
            self._flow_served[_flow(seq)] += len(fed)
            self._publish(seq)
            if i in sampled.prompt_logits:
                seq.prompt_logits.append(sampled.prompt_logits[i])

    def _chunk(self, prefilling: list[Sequence], budget: int) -> ScheduledBatch:
        """Prefilling sequences in order while their padded batch fits the step's token budget; the first
        one is cut to the budget if longer, the others join only whole."""
        batch: list[Sequence] = []
        inputs: list[list[int]] = []
        width = 0
        for seq in prefilling:
            pending = seq.length - seq.computed
            if batch and max(width, pending) * (len(batch) + 1) > budget:
                break
            take = min(pending, budget)
            batch.append(seq)
            inputs.append(seq.tokens()[seq.computed : seq.computed + take])
            width = max(width, take)
        return ScheduledBatch("prefill", batch, inputs)

    def _admit(self) -> None:
        """Move waiting sequences into the running set, in fair-queue order, while the sequence, prefill and
        KV-cache budgets allow; each takes the cached blocks of its prefix and new ones for the rest. A
        sequence whose adapter cannot be resident yet (read under way, no slot free), or whose tenant has a
        full step of prompt still to prefill, is skipped and keeps its place. With every slot taken, a tenant
        below its weighted share of them takes one from the tenant furthest over its share, once its sequence
        is sure to be admitted. If the pool cannot grow (out of memory) the sequences it was for are answered
        with an error; none is left in no queue holding its adapter."""
        now = time.monotonic()
        cache = self.runner.cache
        backlog: collections.Counter[str] = collections.Counter()
        holding: collections.Counter[str] = collections.Counter()
        for seq in self.running:
            holding[seq.request.tenant] += 1
            backlog[seq.request.tenant] += max(0, seq.length - seq.computed - 1)
        weights = {s.request.tenant: s.request.weight for s in chain(self.waiting, self.running)}
        share = {name: self.max_num_seqs * weight / sum(weights.values()) for name, weight in weights.items()}
        stuck: set[str] = set()  # tenants that can take no slot in this step
        queued = {seq.request.tenant for seq in self.waiting}
        for seq in sorted(self.waiting, key=self._turn):
            tenant = seq.request.tenant
            if tenant in stuck or backlog[tenant] >= self.max_num_batched_tokens:
                continue
            victim = None
            if len(self.running) >= self.max_num_seqs:
                victim = self._victim(tenant, holding, share)
                if victim is None:
                    stuck.add(tenant)
                    if stuck >= queued:
                        break
                    continue
            # With a block kept per running sequence for its next decode step (else admitting one preempts
            # another); with cached blocks it takes fewer. A lone sequence always runs (the pool holds one of
            # the whole context), so nothing waits forever.
            others = len(self.running) - (victim is not None)
            freed = len(victim.blocks) if victim is not None else 0
            if others and cache.blocks_for(seq.length) + others > cache.num_free + freed:
                break
            if not self._claim_adapter(seq, now):
                continue
            if victim is not None:
                holding[victim.request.tenant] -= 1
                backlog[victim.request.tenant] -= max(0, victim.length - victim.computed - 1)
                self._preempt(victim)
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
            holding[tenant] += 1
            backlog[tenant] += max(0, seq.length - seq.computed - 1)
        # Every queued sequence without its adapter, also those behind where admission stopped: their reads
        # stay asked, and the wait that makes a busy adapter drain goes on.
        waiting = [seq.request.adapter.key for seq in self.waiting if seq.resident is None and seq.request.adapter]
        ADAPTER_QUEUE.inc(len(waiting) - self._num_waiting_for_adapters)  # inc: a vLLM engine beside it counts too
        self._num_waiting_for_adapters = len(waiting)
        self.residency.settle(set(waiting))

    def _victim(self, tenant: str, holding: collections.Counter[str], share: dict[str, float]) -> Sequence | None:
        """With every slot taken, the sequence `tenant` may take its slot from: if it holds fewer than its
        weighted share, the newest of the tenant furthest over its share (recomputed when its turn comes)."""
        if holding[tenant] + 1 > share[tenant]:
            return None
        over = max((name for name, n in holding.items() if n), key=lambda name: holding[name] / share[name])
        if holding[over] <= share[over]:
            return None
        return next(s for s in reversed(self.running) if s.request.tenant == over)

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
