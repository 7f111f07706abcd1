"""One step of the torch engine, in vLLM v1's and nano-vllm's shape: the scheduler decides what runs
(admission, adapters, KV blocks, token budget), the model runner runs the forward pass and samples, the
output processor detokenizes and checks stops, and the scheduler sends the outputs and frees what ended.
All of it runs on the engine thread."""

import logging
import time
from collections.abc import Callable

from tokenizers import Tokenizer

from server.engine.base import GenerationOutput, GenerationRequest
from server.engine.torch.detokenizer import IncrementalText
from server.engine.torch.model_runner import ModelRunner
from server.engine.torch.output_processor import OutputProcessor
from server.engine.torch.sampler import make_generator
from server.engine.torch.scheduler import Scheduler
from server.engine.torch.sequence import Sequence
from server.metrics import ENGINE_STEP_TIME, GATEWAY_PROTOCOL, KV_CACHE_BLOCKS, EngineLoad
from server.structured import new_matcher

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer: Tokenizer):
        self.scheduler, self.runner, self.tokenizer = scheduler, runner, tokenizer
        self.outputs = OutputProcessor(runner.eos_token_ids, scheduler.max_model_len)
        self.exports_load = False  # the server's engine publishes the gateway protocol's metrics (one per server)

    def new_sequence(self, request: GenerationRequest, emit: Callable[[GenerationOutput], None]) -> Sequence:
        sampling = request.sampling
        return Sequence(request, emit, IncrementalText(self.tokenizer, sampling.stop),
                        make_generator(sampling, self.runner.device), new_matcher(request))

    def step(self) -> bool:
        """One step; False when nothing could run (every waiting sequence waits for its adapter)."""
        start = time.perf_counter()
        try:
            batch = self.scheduler.schedule()
            if batch is None:
                return False
            try:
                sampled = self.runner.execute(batch)
            except Exception as exc:  # a failed batch fails its own requests, never the engine
                log.exception("%s step failed for %d sequences", batch.phase, len(batch.sequences))
                self.scheduler.finish(batch.sequences,
                                      [s.failure(f"generation failed: {exc}") for s in batch.sequences])
                return True
            self.scheduler.update(batch, sampled)
            self.scheduler.finish([batch.sequences[i] for i in sampled.rows], self.outputs.process(batch, sampled))
            ENGINE_STEP_TIME.labels(batch.phase).observe(time.perf_counter() - start)
            return True
        finally:
            self.observe()

    def observe(self) -> None:
        """Publish the KV cache's blocks and, where this engine is the server's, the load a gateway reads."""
        cache, scheduler = self.runner.cache, self.scheduler
        KV_CACHE_BLOCKS.labels("used").set(cache.num_used)
        KV_CACHE_BLOCKS.labels("cached").set(cache.num_cached)
        KV_CACHE_BLOCKS.labels("free").set(cache.num_free - cache.num_cached)
        if not self.exports_load:
            return
        slots = scheduler.residency.slots
        # A name a request gave that resolved to a resident version is answered without a load too (an alias).
        asked = {seq.request.model for seq in scheduler.running if seq.request.adapter is not None}
        waited = {seq.request.adapter.name for seq in scheduler.waiting
                  if seq.request.adapter is not None and seq.resident is None}
        GATEWAY_PROTOCOL.load = EngineLoad(
            running=len(scheduler.running), waiting=len(scheduler.waiting),
            kv_cache_usage=cache.num_used / cache.max_blocks, block_size=cache.block_size, num_blocks=cache.max_blocks,
            max_adapters=slots.capacity, running_adapters=tuple(sorted({*slots.names(), *asked})),
            waiting_adapters=tuple(sorted(waited)), updated_at=time.time())
