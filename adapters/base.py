"""What every adapter kind shares: the base model it must fit, errors, and how files are read."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Pickle-based weight files run code when loaded: never read them.
_PICKLED = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")


class AdapterError(ValueError):
    """An adapter that cannot be served on this base; `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


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
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(WEIGHTS_FILE, f"not a valid safetensors file ({exc})") from exc


def expect_shape(field: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise AdapterError(field, f"has shape {tuple(tensor.shape)}, the base model needs {shape}")


def require(field: str, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise AdapterError(field, f"tensor `{key}` is missing from {WEIGHTS_FILE}")
    return tensors[key].float()


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise AdapterError(CONFIG_FILE, f"missing in {folder}") from exc
    except json.JSONDecodeError as exc:
        raise AdapterError(CONFIG_FILE, f"not valid JSON ({exc})") from exc
