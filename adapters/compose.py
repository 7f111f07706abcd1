"""A new LoRA composed from registered LoRAs with PEFT's `add_weighted_adapter` (linear, cat, SVD, TIES, DARE,
magnitude pruning), checked first so that an incompatible set is refused naming the adapter, before the base
model is loaded."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from adapters.base import AdapterError, AdapterGone

Combination = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                      "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
# Methods that add the LoRAs' factors rank by rank, so the ranks must agree (PEFT's rule).
SAME_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
NEEDS_DENSITY = {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
                 "magnitude_prune_svd"}
COMPOSED = "composed"  # the new adapter's name inside the PEFT model, and its folder under the output


@dataclass(frozen=True)
class Source:
    field: str  # the request field that named it, for errors
    folder: Path
    weight: float


def check_sources(sources: list[Source], method: str, density: float | None) -> list[LoraConfig]:
    """Refuse, naming the field, what PEFT would refuse or silently mishandle."""
    if (density is None) == (method in NEEDS_DENSITY):
        raise AdapterError("compose.density", f"{method} {'needs' if density is None else 'takes no'} density")
    configs = []
    for source in sources:
        config = LoraConfig.from_pretrained(source.folder)
        if config.modules_to_save or getattr(config, "target_parameters", None):
            raise AdapterError(source.field, "an adapter that trains whole modules or parameters cannot be composed")
        configs.append(config)
    first = configs[0]
    for source, config in zip(sources[1:], configs[1:]):
        if isinstance(config.target_modules, str) != isinstance(first.target_modules, str):
            raise AdapterError(source.field, "target_modules is a pattern in one adapter and a list in another")
        for setting in ("layers_to_transform", "layers_pattern", "exclude_modules"):  # PEFT places the result by
            if getattr(config, setting) != getattr(first, setting):                   # the first one's only
                raise AdapterError(source.field, f"{setting} differs from the first adapter's")
        if method in SAME_RANK and (config.r, config.rank_pattern) != (first.r, first.rank_pattern):
            raise AdapterError(source.field, f"rank {config.r} differs from the first adapter's {first.r}; {method} "
                                             f"adds the LoRAs rank by rank (cat or an *_svd method composes them)")
    return configs


def compose_loras(base: Path, sources: list[Source], method: str, density: float | None, out: Path) -> Path:
    """Compose `sources` (checked with check_sources) into a LoRA under `out`; returns its folder. DARE's random
    drops are seeded, so a composition is reproducible."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, low_cpu_mem_usage=True)
    names = [f"source{i}" for i in range(len(sources))]
    peft = None
    for name, source in zip(names, sources):
        try:
            if peft is None:
                peft = PeftModel.from_pretrained(model, source.folder, adapter_name=name)
            else:
                peft.load_adapter(source.folder, adapter_name=name)
        except (OSError, ValueError) as exc:  # its files went (a delete on another replica) or do not load
            raise AdapterGone(source.field, f"its files could not be read: {exc}") from exc
    with torch.random.fork_rng(devices=[]):  # on the CPU: the process's CUDA generators stay as they are
        torch.manual_seed(0)
        try:
            peft.add_weighted_adapter(names, [s.weight for s in sources], COMPOSED, combination_type=method,
                                      density=density)
        except ValueError as exc:
            raise AdapterError("compose", str(exc)) from exc
    # PEFT copies the first source's config with lora_alpha = r: the sources' scalings are folded into the
    # weights, so the result's scaling must be 1, which rsLoRA's alpha / sqrt(r) is not.
    peft.peft_config[COMPOSED].use_rslora = False
    peft.save_pretrained(out, selected_adapters=[COMPOSED])  # a named adapter goes to its own subfolder
    return out / COMPOSED
