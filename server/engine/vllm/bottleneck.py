"""Bottleneck adapters inside vLLM's model (worker process).

A bottleneck adds up(act(down(h))) to a decoder layer's attention and/or MLP output: a non-linearity, so
no LoRA can express it. When vLLM wraps the model for LoRA (load_lora_model, before the model is compiled
or warmed up), every layer's attention and MLP get a forward hook calling `swapyard::bottleneck_`, an
opaque custom op, so torch.compile keeps it as a call. A bottleneck request carries its own all-zero LoRA,
so vLLM schedules, batches and maps it like any LoRA; the op reads vLLM's per-token LoRA slots, finds which
slots hold a bottleneck's LoRA id, and adds that adapter's output to those tokens' rows only.

The op's work depends on the batch (which slots hold bottlenecks), so CUDA graphs, which replay fixed
work, cannot hold it: on CUDA the engine runs with cudagraph_mode NONE (torch.compile stays on).
"""

import dataclasses
from pathlib import Path

import torch
from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY, LoRAModelManager

from adapters.bottleneck import POSITIONS, BottleneckAdapter, read_bottleneck

LAYERS, ATTN, MLP = "model.layers", "self_attn", "mlp"  # where vLLM's decoder models keep them, as in HF

# LoRA id -> the bottleneck that requests carrying that LoRA id get, in the worker.
BOTTLENECKS: dict[int, BottleneckAdapter] = {}
_lora_manager: LoRAModelManager | None = None


def _weights(adapter: BottleneckAdapter) -> dict[str, torch.Tensor]:
    return {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter) if f.name != "config"}


def add_bottleneck(lora_id: int, folder: str, dtype: torch.dtype) -> None:
    adapter = read_bottleneck(Path(folder))
    BOTTLENECKS[lora_id] = dataclasses.replace(adapter, **{k: t.to(dtype) for k, t in _weights(adapter).items()})


def drop_bottleneck(lora_id: int) -> None:
    BOTTLENECKS.pop(lora_id, None)


def held_bytes() -> int:
    return sum(t.nbytes for adapter in BOTTLENECKS.values() for t in _weights(adapter).values())


@torch.library.custom_op("swapyard::bottleneck_", mutates_args=("hidden",))
def bottleneck_(hidden: torch.Tensor, layer: int, position: int) -> None:
    """Add to each token's row of `hidden` (tokens, hidden_size) the output of its request's bottleneck."""
    if not BOTTLENECKS:
        return
    slots = _lora_manager.punica_wrapper_mapping[DEFAULT_LANGUAGE_WRAPPER_KEY].token_lora_indices
    slots = slots[:hidden.shape[0]]
    slot_ids, where = _lora_manager.lora_index_to_id, POSITIONS[position]
    for slot in torch.unique(slots).tolist():
        adapter = BOTTLENECKS.get(slot_ids[slot]) if slot >= 0 else None
        if adapter is None or where not in adapter.config.positions:
            continue
        rows = (slots == slot).nonzero().squeeze(1)
        hidden.index_add_(0, rows, adapter.delta(hidden[rows], layer, where))


@bottleneck_.register_fake
def _(hidden: torch.Tensor, layer: int, position: int) -> None:
    return None


def install_hooks(model: torch.nn.Module, lora_manager: LoRAModelManager) -> None:
    """Hook every decoder layer's attention and MLP output (both return a (tokens, hidden) tensor in vLLM)."""
    global _lora_manager
    _lora_manager = lora_manager
    modules = dict(model.named_modules())
    layer = 0
    while f"{LAYERS}.{layer}" in modules:  # with pipeline parallelism, other stages' layers are placeholders
        for position, name in enumerate((ATTN, MLP)):
            def hook(_module, _inputs, output, layer=layer, position=position):
                torch.ops.swapyard.bottleneck_(output, layer, position)
                return output
            if (module := modules.get(f"{LAYERS}.{layer}.{name}")) is not None:
                module.register_forward_hook(hook)
        layer += 1
