"""Picks and builds the engine named by the settings."""

import importlib.util
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.base import Engine
from server.settings import EngineSettings


def choose_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if torch.cuda.is_available() and has_vllm else "torch"


def build_engine(settings: EngineSettings, model_path: Path, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int) -> Engine:
    kind = choose_engine(settings.engine)
    if kind == "vllm":
        from server.engine.vllm_engine import VLLMEngine

        return VLLMEngine(settings, model_path, max_model_len)
    from server.engine.torch_engine import TorchEngine

    return TorchEngine(settings, model_path, tokenizer, max_model_len)
