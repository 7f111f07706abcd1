"""The pure-torch engine: an asyncio front over a scheduler that runs on its own thread."""

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from adapters.base import AdapterError, AdapterLoadError, BaseModelSpec
from adapters.loading import Adapter
from server.engine.base import FailureWindow, GenerationOutput, GenerationRequest, check_exact_merge
from server.engine.torch.engine_core import EngineCore
from server.engine.torch.model_runner import ModelRunner
from server.engine.residency import AdapterReader, AdapterRef, tier
from server.engine.torch.scheduler import Scheduler
from server.engine.torch.residency import TorchResidency
from server.host import ENGINE_TORCH_THREADS, set_torch_threads
from server.metrics import ENGINE_FAILURES, GATEWAY_PROTOCOL
from server.settings import EngineSettings

log = logging.getLogger(__name__)

_STOP = object()
# The engine loop is restarted after an unexpected failure (every request in flight fails with it), unless
# it failed this many times within the window: then it stays down and /health reports it.
MAX_FAILURES, FAILURE_WINDOW_S = 3, 60.0
IDLE_WAKE_S = 0.5  # while sequences wait for adapters and none runs: how often admission is tried again


class TorchEngine:
    def __init__(self, settings: EngineSettings, model_path: Path, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int, *, exports_load: bool = True):
        """`exports_load`: publish the gateway protocol's metrics (not for an engine beside vLLM, which does)."""
        self.max_model_len = max_model_len
        self._allow_inexact_merge = settings.allow_inexact_merge
        runner = ModelRunner(model_path, device=settings.device, dtype=settings.dtype, max_model_len=max_model_len,
                             kv_cache_bytes=int(settings.kv_cache_memory_gb * 2**30),
                             # Headroom: a replaced version holds its slot until its running requests end.
                             max_resident_adapters=2 * settings.max_resident_adapters,
                             grammar_mask_budget_s=settings.max_grammar_mask_ms / 1000,
                             prepack_weights=settings.prepack_weights, batch_invariant=settings.batch_invariant,
                             kv_cache_dtype=settings.kv_cache_dtype, fused_norms=settings.fused_norms)
        self._reader = AdapterReader(BaseModelSpec.from_pretrained(model_path), settings.max_lora_rank,
                                     settings.max_cpu_adapters, pin=runner.device.type == "cuda")
        self._residency = TorchResidency(runner.adapters, settings.max_resident_adapters, read=self._ask_read,
                                         keep=self._keep_on_host)
        self._scheduler = Scheduler(
            runner, self._residency, max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens or (512 if runner.device.type == "cpu" else 2048),
            enable_prefix_caching=settings.enable_prefix_caching,
        )
        self._core = EngineCore(self._scheduler, runner, tokenizer.backend_tokenizer)
        self._core.exports_load = exports_load
        # Everything the event loop asks of the scheduler goes through this queue: one thread owns its state.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="swapyard-torch-engine", daemon=True)
        self.failure: str | None = None  # why the engine no longer serves; None while it does
        self.is_restarting = False  # the loop restarts in place, between two messages
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reads: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def shutdown(self) -> None:
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        if self._core.exports_load:
            GATEWAY_PROTOCOL.load = None

    def tier(self, ref: AdapterRef) -> str:
        return tier(self._residency.slots, self._reader, ref)

    def check_adapter(self, adapter: Adapter) -> None:
        """Every kind runs here."""

    def engine_for(self, kind: str) -> str:
        return "torch"

    async def read_adapter(self, folder: Path) -> Adapter:
        return await self._reader.read_folder(folder)

    async def add_adapter(self, ref: AdapterRef, adapter: Adapter) -> None:
        """Serve `ref` from the next step (placed at once if a slot is free or idle); requests already
        running keep their version."""
        await self._on_engine_thread(lambda: self._residency.add(ref, adapter))

    async def remove_adapter(self, name: str) -> None:
        self._reader.forget(name)
        await self._on_engine_thread(lambda: self._residency.remove(name))

    @property
    def merged(self) -> str | None:
        return self._residency.merged

    async def merge_adapter(self, ref: AdapterRef) -> None:
        """Between two steps: running requests go on unchanged, the fold's own rows now without a LoRA."""
        runner = self._scheduler.runner  # owns the dtype, and its adapter bank the batch-invariant mode
        check_exact_merge(runner.dtype, runner.adapters.batch_invariant, self._allow_inexact_merge)
        adapter = await self._reader.read(ref)
        await self._on_engine_thread(lambda: self._residency.merge(ref, adapter))

    async def unmerge_adapter(self) -> None:
        await self._on_engine_thread(self._scheduler.runner.adapters.unmerge)

    def _ask_read(self, ref: AdapterRef) -> None:
        """From the engine thread: read `ref` on the event loop, and offer it to the residency when done."""
        self._loop.call_soon_threadsafe(self._start_read, ref)

    def _start_read(self, ref: AdapterRef) -> None:
        async def read() -> None:
            try:
                adapter = await self._reader.read(ref)
            except AdapterError as exc:
                adapter = exc
            except Exception as exc:  # answered all the same: the sequences waiting for it must not wait forever
                log.exception("reading adapter %s failed", ref.name)
                adapter = AdapterLoadError("model", f"adapter `{ref.name}` could not be read: {exc}")
            self._inbox.put(lambda: self._residency.offer(ref, adapter))

        task = asyncio.create_task(read())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    def _keep_on_host(self, ref: AdapterRef, adapter: Adapter) -> None:
        self._loop.call_soon_threadsafe(self._reader.keep, ref, adapter)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self.failure is not None:
            yield GenerationOutput("", [], len(request.prompt_token_ids), 0, "abort", self.failure)
            return
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()

        def emit(out: GenerationOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        seq = self._core.new_sequence(request, emit)
        self._inbox.put(lambda: self._scheduler.add(seq))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.is_finished
                yield out
        finally:
            if not finished:  # the consumer left early (client disconnect): free the slot
                self._inbox.put(lambda: self._scheduler.abort(request.request_id))

    async def _on_engine_thread(self, work: Callable[[], None]) -> None:
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(work())
            except Exception as exc:
                done.set_exception(exc)

        self._inbox.put(run)
        await asyncio.wrap_future(done)

    def _loop(self) -> None:
        """Run the scheduler; restart it after an unexpected failure, within the bounds above."""
        set_torch_threads(ENGINE_TORCH_THREADS)  # the one thread of the process that runs torch on all cores
        failures = FailureWindow(FAILURE_WINDOW_S)
        while True:
            try:
                self._serve()
                return
            except Exception as exc:
                log.exception("the engine loop failed; every request in flight fails with it")
                ENGINE_FAILURES.inc()
                if (count := failures.add()) >= MAX_FAILURES:  # decided before the requests hear of it
                    self.failure = f"the engine failed {count} times in {FAILURE_WINDOW_S:.0f} s: {exc}"
                self._scheduler.abort_all("error", f"engine error: {exc}")
                self._scheduler.runner.cache.clear()  # whatever the failed step left must not reach new rows
                if self.failure is not None:
                    log.error("%s; it stays down and /health answers 503", self.failure)
                    self._refuse_from_now_on()
                    return

    def _serve(self) -> None:
        scheduler, ran = self._scheduler, True
        self._core.observe()  # an idle engine's load is there for the first scrape
        while True:
            # Blocks while nothing can run: no work, or only sequences waiting for their adapter's read (which
            # arrives here). The timeout lets a wait for a slot turn to draining another adapter.
            messages = [] if scheduler.has_work and ran else [self._next_message(scheduler.has_work)]
            while not self._inbox.empty():
                messages.append(self._inbox.get_nowait())
            for message in messages:
                if message is _STOP:
                    scheduler.abort_all("abort", "the server is shutting down")
                    return
                try:  # each message answers its own caller on failure; the ones after it still run
                    message()
                except Exception:
                    log.exception("engine work failed")
            ran = scheduler.has_work and self._core.step()
            if not ran:  # a step observes itself; an abort or a read that ran nothing is observed here
                self._core.observe()

    def _next_message(self, has_work: bool):
        try:
            return self._inbox.get(timeout=IDLE_WAKE_S if has_work else None)
        except queue.Empty:
            return lambda: None

    def _refuse_from_now_on(self) -> None:
        """A dead engine still answers what reaches its inbox, so nobody waits on it forever."""
        while True:
            message = self._inbox.get()
            if message is _STOP:
                return
            try:
                message()  # a new request joins the queue and is answered just below
            except Exception:
                log.exception("engine work failed after the engine went down")
            self._scheduler.abort_all("abort", self.failure)
