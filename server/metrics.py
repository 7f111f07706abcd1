"""Prometheus metrics. Request metrics carry a `model` label: the base model's name or the adapter's."""

import collections
import time

from prometheus_client import Counter, Gauge, Histogram, Info

from server.engine.base import GenerationOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

QUEUE_TIME = Histogram("swapyard_request_queue_time_seconds", "Arrival to first scheduled step.",
                       ["model"], buckets=_LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("swapyard_time_to_first_token_seconds", "Arrival to first generated token.",
                                ["model"], buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("swapyard_inter_token_latency_seconds", "Time between consecutive tokens.",
                                ["model"], buckets=_LATENCY_BUCKETS)
E2E_LATENCY = Histogram("swapyard_e2e_request_latency_seconds", "Arrival to last token.",
                        ["model"], buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("swapyard_prompt_tokens", "Prompt tokens processed.", ["model"])
GENERATION_TOKENS = Counter("swapyard_generation_tokens", "Tokens generated.", ["model"])
REQUESTS = Counter("swapyard_requests", "Finished requests by finish reason.", ["model", "finish_reason"])
RUNNING = Gauge("swapyard_requests_running", "Requests generating tokens.", ["model"])
WAITING = Gauge("swapyard_requests_waiting", "Requests waiting for their first token.", ["model"])
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
RESIDENT_ADAPTERS = Gauge("swapyard_adapters_resident", "Adapters resident on the engine's device.")
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


_PER_MODEL = (QUEUE_TIME, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_LATENCY, PROMPT_TOKENS, GENERATION_TOKENS,
              REQUESTS, RUNNING, WAITING, ADAPTER_LOADS, ADAPTER_EVICTIONS, ADAPTER_LOAD_TIME, ADAPTER_WAIT_TIME,
              MERGED_ADAPTER)


_live: collections.Counter[str] = collections.Counter()  # requests of each model whose metrics are open
_forgotten: set[str] = set()  # deleted while requests of it ran: its series go when the last of them ends


def forget_model(name: str) -> None:
    """Drop a deleted adapter's series, so registering and deleting adapters never grows /metrics. Requests of
    it still running keep them until the last one ends: removed under them, their observations would bring
    the series back, and their gauges would end below zero."""
    if _live[name]:
        _forgotten.add(name)
    else:
        for metric in _PER_MODEL:
            metric.remove_by_labels({"model": name})


class RequestMetrics:
    """Records one request's latencies from the outputs the client receives."""

    def __init__(self, model: str, tenant: str, num_prompt_tokens: int, arrival_time: float):
        self.model, self.tenant, self.arrival_time = model, tenant, arrival_time
        self._num_prompt_tokens = num_prompt_tokens
        self._last_token_time: float | None = None
        _live[model] += 1
        WAITING.labels(model).inc()

    def observe(self, out: GenerationOutput) -> None:
        now = time.monotonic()
        if out.queue_time is not None:
            QUEUE_TIME.labels(self.model).observe(out.queue_time)
        if out.token_ids:
            if self._last_token_time is None:
                TIME_TO_FIRST_TOKEN.labels(self.model).observe(now - self.arrival_time)
                WAITING.labels(self.model).dec()
                RUNNING.labels(self.model).inc()
            else:
                INTER_TOKEN_LATENCY.labels(self.model).observe(now - self._last_token_time)
            self._last_token_time = now
            GENERATION_TOKENS.labels(self.model).inc(len(out.token_ids))
            TENANT_TOKENS.labels(self.tenant, "generated").inc(len(out.token_ids))

    def close(self, finish_reason: str) -> None:
        (RUNNING if self._last_token_time is not None else WAITING).labels(self.model).dec()
        PROMPT_TOKENS.labels(self.model).inc(self._num_prompt_tokens)
        TENANT_TOKENS.labels(self.tenant, "prompt").inc(self._num_prompt_tokens)
        E2E_LATENCY.labels(self.model).observe(time.monotonic() - self.arrival_time)
        REQUESTS.labels(self.model, finish_reason).inc()
        _live[self.model] -= 1
        if not _live[self.model]:
            del _live[self.model]
            if self.model in _forgotten:
                _forgotten.discard(self.model)
                forget_model(self.model)
