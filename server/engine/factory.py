"""Picks and builds the engine named by the settings."""

import importlib.util
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.base import Engine
from server.engine.hybrid_engine import HybridEngine
from server.settings import EngineSettings


def choose_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if torch.cuda.is_available() and has_vllm else "torch"


def build_engine(settings: EngineSettings, model_path: Path, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int) -> Engine:
    kind = choose_engine(settings.engine)
    from server.engine.torch_engine import TorchEngine

    def torch_engine() -> Engine:
        return TorchEngine(settings, model_path, tokenizer, max_model_len)

    if kind == "torch":
        return torch_engine()
    from server.engine.vllm_engine import VLLMEngine

    vllm = VLLMEngine(settings, model_path, max_model_len)
    return HybridEngine(vllm, torch_engine) if settings.torch_beside_vllm else vllm
