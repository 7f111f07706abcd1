"""Prometheus metrics. Request metrics carry a `model` label, the name the request gave (the base model's, an
adapter's, a pinned version's or an alias), and a `version` label, the adapter version that served it
(`name@N`; empty for the base model), so a canary compares with the version beside it."""

import collections
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.base import GenerationOutput

_REQUEST_LABELS = ["model", "version"]
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

QUEUE_TIME = Histogram("swapyard_request_queue_time_seconds", "Arrival to first scheduled step.",
                       _REQUEST_LABELS, buckets=_LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("swapyard_time_to_first_token_seconds", "Arrival to first generated token.",
                                _REQUEST_LABELS, buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("swapyard_inter_token_latency_seconds", "Time between consecutive tokens.",
                                _REQUEST_LABELS, buckets=_LATENCY_BUCKETS)
E2E_LATENCY = Histogram("swapyard_e2e_request_latency_seconds", "Arrival to last token.",
                        _REQUEST_LABELS, buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("swapyard_prompt_tokens", "Prompt tokens processed.", _REQUEST_LABELS)
GENERATION_TOKENS = Counter("swapyard_generation_tokens", "Tokens generated.", _REQUEST_LABELS)
REQUESTS = Counter("swapyard_requests", "Finished requests by finish reason.", [*_REQUEST_LABELS, "finish_reason"])
RUNNING = Gauge("swapyard_requests_running", "Requests generating tokens.", _REQUEST_LABELS)
WAITING = Gauge("swapyard_requests_waiting", "Requests waiting for their first token.", _REQUEST_LABELS)
ADAPTER_LOADS = Counter("swapyard_adapter_loads", "Adapters loaded onto the engine's device.", ["model"])
ADAPTER_EVICTIONS = Counter("swapyard_adapter_evictions", "Adapters evicted to make room (LRU).", ["model"])
ADAPTER_LOAD_TIME = Histogram("swapyard_adapter_load_seconds", "Putting one adapter on the device, with reading and "
                              "checking it when that was not done before the request queued for a slot.",
                              ["model"], buckets=_LATENCY_BUCKETS)
ADAPTER_WAIT_TIME = Histogram("swapyard_adapter_wait_seconds", "Time a request for an adapter that was not resident "
                              "waited for it: its load, and any wait for a free slot.", ["model"],
                              buckets=_LATENCY_BUCKETS)
ADAPTER_HOST_CACHE = Counter("swapyard_adapter_host_cache", "Loads onto the device served from the host-memory "
                             "tier (hit) or read from the store on disk (miss).", ["result"])
ADAPTER_QUEUE = Gauge("swapyard_adapter_queue_length", "Requests waiting for their adapter to be loaded or for a "
                      "free device slot.")
MERGED_ADAPTER = Gauge("swapyard_adapter_merged", "1 while the adapter is folded into the base weights.", ["model"])
RESIDENT_ADAPTERS = Gauge("swapyard_adapters_resident", "Adapter versions resident in each tier: on the engine's "
                          "device (serving), or parsed in host memory (a reload without the disk).", ["tier"])
REJECTED = Counter("swapyard_requests_rejected", "Requests refused before reaching the engine.", ["reason"])
# Per tenant: the name the keys file gives a key's tenant (`key#N` for the N-th unnamed key), never the key.
TENANT_IN_FLIGHT = Gauge("swapyard_tenant_requests_in_flight", "Generation requests of the tenant running or queued.",
                         ["tenant"])
TENANT_REJECTED = Counter("swapyard_tenant_requests_rejected", "The tenant's requests refused by a limit (the error "
                          "code names which).", ["tenant", "code"])
TENANT_TOKENS = Counter("swapyard_tenant_tokens", "Tokens the tenant's requests used (the engine's work: each "
                        "of n choices counts its prompt).", ["tenant", "kind"])
ENGINE_FAILURES = Counter("swapyard_engine_failures", "Unexpected engine failures (each fails the requests in "
                          "flight; the engine restarts unless they repeat).")
ENGINE_INFO = Info("swapyard_engine", "Each engine serving, and the device and dtype it computes in.", ["engine"])
KV_CACHE_BLOCKS = Gauge("swapyard_kv_cache_blocks", "The torch engine's KV-cache blocks: used by sequences, cached "
                        "(a prefix nobody holds now, evicted when the pool needs the block) or free (in the pool "
                        "or not yet allocated, within --kv-cache-memory-gb).", ["state"])
# vLLM's pair: the hit rate is rate(hits) / rate(queries).
PREFIX_CACHE_QUERIES = Counter("swapyard_prefix_cache_queries", "Tokens of admitted sequences (prompt, virtual "
                               "tokens, and after a preemption what was generated) looked up in the torch engine's "
                               "prefix cache.")
PREFIX_CACHE_HITS = Counter("swapyard_prefix_cache_hits", "Of the tokens looked up, those found in cached blocks "
                            "(not computed again).")
VLLM_WORKER_ADAPTER_BYTES = Gauge("swapyard_vllm_worker_adapter_bytes", "Host memory vLLM's workers hold for "
                                  "prefix adapters' K/V and bottleneck adapters' weights.", ["kind"])
PREEMPTIONS = Counter("swapyard_engine_preemptions", "Running sequences preempted when the KV cache had no free block; "
                      "each is recomputed from its tokens when blocks free up.")
ENGINE_BATCH_SIZE = Histogram("swapyard_engine_batch_size", "Sequences run together in one engine step.",
                              ["phase"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
ENGINE_STEP_TIME = Histogram("swapyard_engine_step_seconds", "One torch engine step: scheduling, the forward pass, "
                             "sampling and outputs.", ["phase"],
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


@dataclass(frozen=True)
class EngineLoad:
    """What an inference gateway's endpoint picker reads of a model server, as the torch engine last saw it."""

    running: int  # sequences in the running batch
    waiting: int  # sequences queued (for a batch slot, KV blocks or their adapter)
    kv_cache_usage: float  # the fraction of KV-cache blocks in use
    block_size: int
    num_blocks: int
    max_adapters: int  # device slots
    running_adapters: tuple[str, ...]  # names a request may give that this server answers without a load
    waiting_adapters: tuple[str, ...]  # adapters queued requests wait for
    updated_at: float


class GatewayProtocol(Collector):
    """The Gateway API Inference Extension's model-server protocol (its proposal 003) under the names its
    endpoint picker reads by default, vLLM's: queued and running requests, KV-cache use, the LoRA info gauge and
    the cache config. On --engine vllm, vLLM exports them itself and this collector stays empty; it claims no
    names (describe), so vLLM's registering its own never collides with it."""

    def __init__(self):
        self.load: EngineLoad | None = None  # replaced whole by the engine that serves, read at each scrape

    def describe(self):
        return []

    def collect(self):
        if (load := self.load) is None:
            return
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch (torch engine; the "
                                "gateway protocol's TotalRunningRequests).", value=load.running)
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued (the protocol's TotalQueuedRequests).",
                                value=load.waiting)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache blocks in use, 0 to 1 (the protocol's "
                                "KVCacheUtilization).", value=load.kv_cache_usage)
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Adapters on the device (and names resolving to them in "
                                 "running requests) and adapters waited for; the value is when this was seen.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric([str(load.max_adapters), ",".join(load.running_adapters), ",".join(load.waiting_adapters)],
                        load.updated_at)
        yield lora
        cache = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's block size and block count.",
                                  labels=["block_size", "num_gpu_blocks"])
        cache.add_metric([str(load.block_size), str(load.num_blocks)], 1)
        yield cache


GATEWAY_PROTOCOL = GatewayProtocol()
REGISTRY.register(GATEWAY_PROTOCOL)


_PER_REQUEST = (QUEUE_TIME, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_LATENCY, PROMPT_TOKENS, GENERATION_TOKENS,
                REQUESTS, RUNNING, WAITING)
_PER_MODEL = (QUEUE_TIME, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_LATENCY, PROMPT_TOKENS, GENERATION_TOKENS,
              REQUESTS, RUNNING, WAITING, ADAPTER_LOADS, ADAPTER_EVICTIONS, ADAPTER_LOAD_TIME, ADAPTER_WAIT_TIME,
              MERGED_ADAPTER)


# (label, value) of requests whose metrics are open; those deleted meanwhile, with their families: their series go
# when the last of those requests ends.
_live: collections.Counter[tuple[str, str]] = collections.Counter()
_forgotten: dict[tuple[str, str], tuple] = {}


def forget_model(name: str) -> None:
    """Drop a deleted adapter's (or alias's) series, so registering and deleting adapters never grows /metrics.
    Requests of it still running keep them until the last one ends: removed under them, their observations
    would bring the series back, and their gauges would end below zero."""
    _forget(("model", name), _PER_MODEL)


def forget_version(label: str) -> None:
    """Drop the request series of an adapter version that left the registry (pruned or deleted), as above."""
    _forget(("version", label), _PER_REQUEST)


def _forget(key: tuple[str, str], families: tuple) -> None:
    if _live[key]:
        _forgotten[key] = families
        return
    for metric in families:
        metric.remove_by_labels(dict([key]))


class RequestMetrics:
    """Records one request's latencies from the outputs the client receives."""

    def __init__(self, model: str, version: str, tenant: str, num_prompt_tokens: int, arrival_time: float):
        self.model, self.tenant, self.arrival_time = model, tenant, arrival_time
        self._labels = model, version
        self._keys = ("model", model), ("version", version)
        self._num_prompt_tokens = num_prompt_tokens
        self._last_token_time: float | None = None
        for key in self._keys:
            _live[key] += 1
        WAITING.labels(*self._labels).inc()

    def observe(self, out: GenerationOutput) -> None:
        now = time.monotonic()
        if out.queue_time is not None:
            QUEUE_TIME.labels(*self._labels).observe(out.queue_time)
        if out.token_ids:
            if self._last_token_time is None:
                TIME_TO_FIRST_TOKEN.labels(*self._labels).observe(now - self.arrival_time)
                WAITING.labels(*self._labels).dec()
                RUNNING.labels(*self._labels).inc()
            else:
                INTER_TOKEN_LATENCY.labels(*self._labels).observe(now - self._last_token_time)
            self._last_token_time = now
            GENERATION_TOKENS.labels(*self._labels).inc(len(out.token_ids))
            TENANT_TOKENS.labels(self.tenant, "generated").inc(len(out.token_ids))

    def close(self, finish_reason: str) -> None:
        (RUNNING if self._last_token_time is not None else WAITING).labels(*self._labels).dec()
        PROMPT_TOKENS.labels(*self._labels).inc(self._num_prompt_tokens)
        TENANT_TOKENS.labels(self.tenant, "prompt").inc(self._num_prompt_tokens)
        E2E_LATENCY.labels(*self._labels).observe(time.monotonic() - self.arrival_time)
        REQUESTS.labels(*self._labels, finish_reason).inc()
        for key in self._keys:
            _live[key] -= 1
            if not _live[key]:
                del _live[key]
                if (families := _forgotten.pop(key, None)) is not None:
                    _forget(key, families)
