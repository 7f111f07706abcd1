"""What every adapter kind shares: the base model it must fit, errors, and how files are read."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# What an adapter is, in every kind: what the registry stores of a folder it is given.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Pickle-based weight files run code when loaded: never read them.
_PICKLED = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 1 << 20


class AdapterError(ValueError):
    """An adapter that cannot be served on this base; `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class AdapterGone(AdapterError):
    """The adapter a request named left (deleted, or unloaded) before the request reached the engine: the
    same 404 as a name never registered, on every engine."""


class AdapterBusy(AdapterError):
    """The change cannot happen now (a weight swap that would wait too long for running requests): 409,
    nothing changed, try again."""


class AdapterLimit(AdapterError):
    """A registration past one of the server's limits (pinned adapters): 409, nothing changed."""


class AdapterCapacityError(AdapterError):
    """Every adapter slot is pinned or busy: the client should retry later."""


class AdapterLoadError(AdapterError):
    """A registered adapter's stored files no longer load (corrupted on disk): the server's fault, not the client's."""


@dataclass(frozen=True)
class BaseModelSpec:
    """The shapes an adapter is checked against, read from the base model's config without loading weights."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)
    module_names: frozenset[str]

    @classmethod
    def from_pretrained(cls, path: Path) -> "BaseModelSpec":
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "BaseModelSpec":
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        linears = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        return cls(config.model_type, config.hidden_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size, linears,
                   frozenset(name for name, _ in model.named_modules()))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, from safetensors only."""
    for name in _PICKLED:
        if (folder / name).exists() and not (folder / WEIGHTS_FILE).exists():
            raise AdapterError(name, f"pickled weights are refused (loading them can run code); "
                                     f"save the adapter as {WEIGHTS_FILE}")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(WEIGHTS_FILE, f"missing in {folder}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(WEIGHTS_FILE, f"not a valid safetensors file ({exc})") from exc
    for key, tensor in tensors.items():
        # One NaN or inf in a batch's weights can reach every row batched with it: refuse it here.
        if not (tensor.is_floating_point() and torch.isfinite(tensor).all()):
            raise AdapterError(key, "holds NaN or infinite values" if tensor.is_floating_point()
                               else f"is {tensor.dtype}, adapter weights are floating point")
    return tensors


def check_finite(field: str, value: float) -> float:
    """A scale computed from config numbers (alpha / r, ...) must stay finite too."""
    if not math.isfinite(value):
        raise AdapterError(field, f"gives a non-finite scale ({value})")
    return value


def expect_shape(field: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise AdapterError(field, f"has shape {tuple(tensor.shape)}, the base model needs {shape}")


def require(field: str, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise AdapterError(field, f"tensor `{key}` is missing from {WEIGHTS_FILE}")
    return tensors[key].float()


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"{text} overflows")
    return value


def read_config(folder: Path) -> dict:
    """adapter_config.json as a JSON object of finite numbers, bounded in size."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(CONFIG_FILE, f"missing in {folder} (or not a regular file)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(CONFIG_FILE, f"is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_bytes(), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterError(CONFIG_FILE, f"not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(config, dict):
        raise AdapterError(CONFIG_FILE, f"must be a JSON object, not {type(config).__name__}")
    return config


def map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """`value` with `fn` applied to every tensor in it, through dataclasses and dicts (a parsed adapter)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{field.name: map_tensors(getattr(value, field.name), fn) for field in fields(value)})
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    return value
