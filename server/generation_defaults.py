"""The model's own sampling defaults: what its generation_config.json recommends, applied to requests that
leave those fields out (vLLM's `--generation-config auto`). Without them a chat model sampled at OpenAI's
temperature 1.0 can ramble where its authors tuned it for 0.2."""

import logging
from pathlib import Path

from transformers import GenerationConfig

log = logging.getLogger(__name__)

# The fields vLLM takes from generation_config.json (its max_new_tokens is left out here: a server-wide
# bound is --max-tokens-limit).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_sampling_defaults(model_path: Path) -> dict[str, float]:
    """Only what the file sets (HF's own defaults are not the model's advice); {} when there is no file."""
    try:
        config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        return {}
    written = config.to_diff_dict()
    defaults = {name: written[name] for name in SAMPLING_FIELDS if written.get(name) is not None}
    if defaults:
        log.info("sampling defaults from %s/generation_config.json: %s", model_path, defaults)
    return defaults
