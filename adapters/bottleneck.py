"""Bottleneck adapters (Houlsby / Pfeiffer): h + scaling * up(act(down(h))) on a sublayer's output.

PEFT has no such type, so swapyard defines one, beside PEFT's files in the same folder layout:

adapter_config.json:
    {"peft_type": "BOTTLENECK", "bottleneck_size": 16, "non_linearity": "relu",
     "positions": ["attn", "mlp"], "scaling": 1.0, "num_layers": 30, "hidden_size": 576,
     "layers_module": "model.layers", "attn_module": "self_attn", "mlp_module": "mlp"}
adapter_model.safetensors, for each layer i and position p in `positions`:
    layers.{i}.{p}.down.weight (bottleneck_size, hidden)   layers.{i}.{p}.down.bias (bottleneck_size,)
    layers.{i}.{p}.up.weight   (hidden, bottleneck_size)   layers.{i}.{p}.up.bias   (hidden,)

"attn" wraps the attention block's output and "mlp" the MLP's, each before its residual add
(Houlsby places both; Pfeiffer only "mlp").
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file

from adapters.base import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, BaseModelSpec, expect_shape, read_config,
                           read_weights, require)

POSITIONS = ("attn", "mlp")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    peft_type: Literal["BOTTLENECK"] = "BOTTLENECK"
    base_model_name_or_path: str | None = None
    bottleneck_size: int = Field(gt=0)
    """Width of the down-projection."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    positions: list[Literal["attn", "mlp"]] = Field(default_factory=lambda: list(POSITIONS), min_length=1)
    """Sublayer outputs that get an adapter: ["attn", "mlp"] is Houlsby, ["mlp"] Pfeiffer."""
    scaling: float = Field(1.0, allow_inf_nan=False)
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    layers_module: str = "model.layers"
    attn_module: str = "self_attn"
    mlp_module: str = "mlp"


@dataclass(frozen=True)
class BottleneckAdapter:
    """Weights stacked over (layer, position); a position the config leaves out holds zeros (no change)."""

    kind: ClassVar[str] = "bottleneck"
    num_virtual_tokens: ClassVar[int] = 0
    config: BottleneckConfig
    down_weight: torch.Tensor  # (layers, 2, bottleneck, hidden)
    down_bias: torch.Tensor  # (layers, 2, bottleneck)
    up_weight: torch.Tensor  # (layers, 2, hidden, bottleneck)
    up_bias: torch.Tensor  # (layers, 2, hidden)

    def module_name(self, layer: int, position: str) -> str:
        c = self.config
        return f"{c.layers_module}.{layer}.{c.attn_module if position == 'attn' else c.mlp_module}"

    def delta(self, h: torch.Tensor, layer: int, position: str) -> torch.Tensor:
        """What the adapter adds to a sublayer output h (..., hidden)."""
        p = POSITIONS.index(position)
        act = ACTIVATIONS[self.config.non_linearity]
        down = act(F.linear(h, self.down_weight[layer, p], self.down_bias[layer, p]))
        return self.config.scaling * F.linear(down, self.up_weight[layer, p], self.up_bias[layer, p])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2))
        tensors = {}
        for layer in range(self.config.num_layers):
            for position in self.config.positions:
                p, key = POSITIONS.index(position), f"layers.{layer}.{position}"
                tensors[f"{key}.down.weight"] = self.down_weight[layer, p].detach().contiguous()
                tensors[f"{key}.down.bias"] = self.down_bias[layer, p].detach().contiguous()
                tensors[f"{key}.up.weight"] = self.up_weight[layer, p].detach().contiguous()
                tensors[f"{key}.up.bias"] = self.up_bias[layer, p].detach().contiguous()
        save_file(tensors, folder / WEIGHTS_FILE)


def parse_bottleneck_config(raw: dict) -> BottleneckConfig:
    try:
        return BottleneckConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise AdapterError(".".join(map(str, first["loc"])) or CONFIG_FILE, first["msg"]) from exc


def load_bottleneck(config: BottleneckConfig, tensors: dict[str, torch.Tensor],
                    base: BaseModelSpec) -> BottleneckAdapter:
    if config.num_layers != base.num_layers:
        raise AdapterError("num_layers", f"{config.num_layers}, but the base model has {base.num_layers} layers")
    if config.hidden_size != base.hidden_size:
        raise AdapterError("hidden_size", f"{config.hidden_size}, but the base model's is {base.hidden_size}")
    for field in ("attn_module", "mlp_module"):
        name = f"{config.layers_module}.0.{getattr(config, field)}"
        if name not in base.module_names:
            raise AdapterError(field, f"the base model has no module `{name}`")
    adapter = stack_bottleneck(config, tensors)
    # The torch engine folds scaling into up, in a stack every row's matmul reads: an overflow there would
    # reach other adapters' rows (0 * inf = NaN), so it is refused here, as LoRA's alpha is.
    for name, weights in (("up.weight", adapter.up_weight), ("up.bias", adapter.up_bias)):
        if not torch.isfinite(weights * config.scaling).all():
            raise AdapterError("scaling", f"{config.scaling} times the {name} overflows")
    return adapter


def read_bottleneck(folder: Path) -> BottleneckAdapter:
    """A bottleneck this server saved after checking it against the base, read back without the base."""
    return stack_bottleneck(parse_bottleneck_config(read_config(folder)), read_weights(folder))


def stack_bottleneck(config: BottleneckConfig, tensors: dict[str, torch.Tensor]) -> BottleneckAdapter:
    layers, r, hidden = config.num_layers, config.bottleneck_size, config.hidden_size
    down_w, down_b = torch.zeros(layers, 2, r, hidden), torch.zeros(layers, 2, r)
    up_w, up_b = torch.zeros(layers, 2, hidden, r), torch.zeros(layers, 2, hidden)
    for layer in range(layers):
        for position in config.positions:
            p, key = POSITIONS.index(position), f"layers.{layer}.{position}"
            for target, name, shape in ((down_w, "down.weight", (r, hidden)), (down_b, "down.bias", (r,)),
                                        (up_w, "up.weight", (hidden, r)), (up_b, "up.bias", (hidden,))):
                tensor = require(f"{key}.{name}", tensors, f"{key}.{name}")
                expect_shape(f"{key}.{name}", tensor, shape)
                target[layer, p] = tensor
    return BottleneckAdapter(config, down_w, down_b, up_w, up_b)


def attach(model: torch.nn.Module, adapter: BottleneckAdapter) -> list[torch.utils.hooks.RemovableHandle]:
    """Apply one adapter to every row of a plain HF model (the reference the engine and the trainer share)."""
    handles = []
    modules = dict(model.named_modules())
    for layer in range(adapter.config.num_layers):
        for position in adapter.config.positions:
            def hook(_module, _inputs, output, layer=layer, position=position):
                return with_delta(output, lambda h: h + adapter.delta(h, layer, position))
            handles.append(modules[adapter.module_name(layer, position)].register_forward_hook(hook))
    return handles


def with_delta(output, change):
    """Attention blocks return (hidden, weights), MLPs a tensor: change only the hidden states."""
    if isinstance(output, tuple):
        return (change(output[0]), *output[1:])
    return change(output)
