"""One dispatch from an adapter folder to a validated adapter of the kind its config names."""

from pathlib import Path

from peft import PeftConfig

from adapters.base import CONFIG_FILE, AdapterError, BaseModelSpec, read_config, read_weights
from adapters.bottleneck import BottleneckAdapter, load_bottleneck, parse_bottleneck_config
from adapters.lora import LoraAdapter, load_lora
from adapters.prefix import PrefixAdapter, load_prefix
from adapters.prompt import PromptAdapter, load_prompt

Adapter = LoraAdapter | PrefixAdapter | PromptAdapter | BottleneckAdapter
PEFT_TYPES = ("LORA", "PREFIX_TUNING", "PROMPT_TUNING", "BOTTLENECK")


def load_adapter(folder: Path, base: BaseModelSpec, *, max_lora_rank: int) -> Adapter:
    """Read and check an adapter folder against the base; every problem is an AdapterError naming its field."""
    try:
        return _load(folder, base, max_lora_rank)
    except AdapterError:
        raise
    except Exception as exc:
        # PEFT's configs take any JSON type anywhere (a list for alpha_pattern, a number for target_modules)
        # and fail deep inside: whatever the files make the parsing raise is the files' fault, a 400.
        raise AdapterError(CONFIG_FILE, f"does not describe a valid adapter ({type(exc).__name__}: "
                                        f"{str(exc)[:200]})") from exc


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _load(folder: Path, base: BaseModelSpec, max_lora_rank: int) -> Adapter:
    raw = read_config(folder)
    peft_type = raw.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError("peft_type", f"`{peft_type}` is not supported; accepted: {', '.join(PEFT_TYPES)}")
    tensors = read_weights(folder)
    if peft_type == "BOTTLENECK":
        return load_bottleneck(parse_bottleneck_config(raw), tensors, base)
    if peft_type == "LORA" and not _is_positive_int(raw.get("r", 8)):  # PEFT's own error names no field
        raise AdapterError("r", f"must be a positive integer, not {str(raw['r'])[:40]}")
    config = PeftConfig.from_peft_type(**raw)
    if peft_type == "LORA":
        return load_lora(config, tensors, base, max_lora_rank)
    if peft_type == "PREFIX_TUNING":
        return load_prefix(config, tensors, base)
    return load_prompt(config, tensors, base)
