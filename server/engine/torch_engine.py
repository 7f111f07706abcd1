"""The pure-torch engine: an asyncio front over a scheduler that runs on its own thread."""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from server.engine.base import GenerationOutput, GenerationRequest
from server.engine.model_runner import ModelRunner
from server.engine.scheduler import Scheduler, Sequence
from server.settings import EngineSettings

log = logging.getLogger(__name__)

_STOP = object()


class TorchEngine:
    def __init__(self, settings: EngineSettings, model_path: Path, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int):
        self.max_model_len = max_model_len
        runner = ModelRunner(model_path, device=settings.device, dtype=settings.dtype, max_model_len=max_model_len,
                             max_num_seqs=settings.max_num_seqs)
        self._scheduler = Scheduler(
            runner, tokenizer.backend_tokenizer, max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            kv_cache_bytes=int(settings.kv_cache_memory_gb * 2**30),
        )
        # Everything the event loop asks of the scheduler goes through this queue: one thread owns its state.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="swapyard-torch-engine", daemon=True)

    async def start(self) -> None:
        self._thread.start()

    async def shutdown(self) -> None:
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()

        def emit(out: GenerationOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self._inbox.put(self._scheduler.new_sequence(request, emit))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.is_finished
                yield out
        finally:
            if not finished:  # the consumer left early (client disconnect): free the slot
                self._inbox.put(request.request_id)

    def _loop(self) -> None:
        scheduler = self._scheduler
        while True:
            messages = [self._inbox.get()] if not scheduler.has_work else []
            while not self._inbox.empty():
                messages.append(self._inbox.get_nowait())
            for message in messages:
                if message is _STOP:
                    scheduler.abort_all("abort", "the server is shutting down")
                    return
                if isinstance(message, Sequence):
                    scheduler.add(message)
                else:
                    scheduler.abort(message)
            if scheduler.has_work:
                try:
                    scheduler.step()
                except Exception as exc:  # e.g. out of memory growing the cache: fail in-flight work, keep serving
                    log.exception("engine step failed")
                    scheduler.abort_all("error", f"engine error: {exc}")
