"""Runs inside vLLM's worker process (AsyncEngineArgs.worker_extension_cls): reloads base linear layers
with LoRA updates folded in, or as they were, through vLLM's own in-place weight reload; holds prefix and
bottleneck adapters' weights for vllm/prefix.py and vllm/bottleneck.py; and, on import (before the model
loads), hooks the bottleneck op into the model and works around vLLM LoRA bugs on mixed batches."""

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from vllm.lora.layers import VocabParallelEmbeddingWithLoRA
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

from server.engine.vllm import bottleneck as vllm_bottleneck, prefix as vllm_prefix


def _embed_without_lora(self: VocabParallelEmbeddingWithLoRA, x: torch.Tensor) -> torch.Tensor:
    return self.base_layer.forward(x)


# vLLM 0.32 with enable_lora and enable_prompt_embeds: a step whose batch holds a prompt-embeds request
# embeds only the token-id positions (GPUModelRunner._preprocess: embed_input_ids(input_ids[is_token_ids])),
# but VocabParallelEmbeddingWithLoRA applies the token-to-LoRA mapping of the whole batch to that subset.
# On CPU (punica_cpu's sgmv_expand) the lengths disagree and the einsum raises, which kills the engine
# core; on CUDA (punica_gpu's lora_expand takes the mapping's first x.size(0) entries) it silently
# applies other tokens' embedding LoRAs. No upstream report was found. swapyard refuses LoRAs on
# embedding layers at registration (adapters/lora.py), so every embedding LoRA weight here is zero and
# the base embedding alone is exact: the LoRA path is skipped on every platform.
VocabParallelEmbeddingWithLoRA.forward = _embed_without_lora


def _skipping_rows_without_lora(op):
    """op(inputs (tokens, in), weights, output, indices (tokens,), ...) with rows whose index is -1 (no
    LoRA) fed zeros, so they add nothing."""

    def masked(inputs, weights, output, indices, *args, **kwargs):
        no_lora = indices < 0
        if bool(no_lora.any()):
            inputs = inputs.masked_fill(no_lora[:, None], 0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    return masked


# vLLM 0.32's PyTorch LoRA ops (the CPU backend's; CUDA's Triton kernels skip index -1) pick each row's
# weights as weights[indices], so a row without a LoRA (-1) in a batch with LoRAs gets the last slot's:
# the base and soft prompts answered with whichever LoRA last sat there. Zeroing those rows' inputs makes
# the shrink and the expand add nothing (adapter weights are finite, checked at registration). The sgmv
# (prefill) ops call these through lora_ops' globals, the decode path through punica_cpu's names.
for _name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
    _masked = _skipping_rows_without_lora(getattr(lora_ops, _name))
    setattr(lora_ops, _name, _masked)
    setattr(punica_cpu, _name, _masked)


def _load_lora_model_with_bottlenecks(self, model, vllm_config, device):
    model = _load_lora_model(self, model, vllm_config, device)
    vllm_bottleneck.install_hooks(model, self.lora_manager._adapter_manager)
    return model


# Hooks go in when vLLM wraps the model for LoRA (swapyard always enables LoRA): after loading, before the
# model is compiled or warmed up, so torch.compile traces them.
_load_lora_model = LoRAModelRunnerMixin.load_lora_model
LoRAModelRunnerMixin.load_lora_model = _load_lora_model_with_bottlenecks


def whole_layers(model: torch.nn.Module, modules: list[str]) -> set[str]:
    """The checkpoint weights that fill the vLLM layers holding `modules` (q_proj brings k_proj and v_proj
    along when vLLM fuses them into qkv_proj): a fused layer is only rebuilt once all its shards arrive."""
    groups = list(getattr(model, "packed_modules_mapping", {}).values())
    names = set()
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        group = next((g for g in groups if leaf in g), [leaf])
        names.update(f"{parent}.{shard}.weight" for shard in group)
    return names


class SwapyardExtension:
    def swapyard_add_bottleneck(self, lora_id: int, folder: str) -> None:
        vllm_bottleneck.add_bottleneck(lora_id, folder, self.model_runner.model_config.dtype)

    def swapyard_drop_bottleneck(self, lora_id: int) -> None:
        vllm_bottleneck.drop_bottleneck(lora_id)

    def swapyard_add_prefix(self, prefix_id: int, file: str) -> None:
        vllm_prefix.add_prefix(prefix_id, file, self.model_runner.model_config.dtype)

    def swapyard_drop_prefix(self, prefix_id: int) -> None:
        vllm_prefix.drop_prefix(prefix_id)

    def swapyard_adapter_bytes(self) -> dict[str, int]:
        return {"prefix": vllm_prefix.held_bytes(), "bottleneck": vllm_bottleneck.held_bytes()}

    def swapyard_fold(self, base_path: str, deltas_file: str | None, modules: list[str]) -> None:
        """Reload `modules` from the base checkpoint, plus the (out, in) deltas in `deltas_file` if given."""
        names = whole_layers(self.model_runner.get_model(), modules)
        deltas = load_file(deltas_file) if deltas_file else {}
        weights = []
        for file in sorted(Path(base_path).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for name in names & set(f.keys()):
                    weight = f.get_tensor(name)
                    delta = deltas.get(name)
                    weights.append((name, weight if delta is None else weight.float() + delta))
        # Every layer left out logs "Failed to load weights" and keeps its weights, as intended here.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=iter(weights))  # also drops loaded LoRAs; they reload on use
        finally:
            layerwise.setLevel(level)
