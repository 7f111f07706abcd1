"""The "auto" hyperparameters: epochs, batch size and learning rate chosen from the dataset's size and the
adapter kind, so that a first run on a small dataset teaches and one on a large dataset does not overfit.

- batch size: the power of two nearest sqrt(examples), from 1 to 32 (20 examples -> 4, 1000 -> 32);
- epochs: 3 (OpenAI's target), raised until the run takes at least 50 optimizer steps (at most 25 epochs),
  lowered to keep it under 25,000 examples seen (at least 1 epoch);
- learning rate: the kind's base rate at batch size 8 (LoRA 1e-3, prefix and prompt 3e-2, bottleneck 1e-3),
  scaled by sqrt(examples per optimizer step / 8) and by `learning_rate_multiplier` (auto: 1); at most 1;
- DPO's beta: 0.1, the DPO paper's and TRL's default (a pair counts as one example above);
- DPO's sft_weight: 1, as RPO (Pang et al., 2024). Pure DPO on the 40 bundled sign-off pairs (LoRA, 2 epochs at
  the auto rate) ranked every held-out pair right yet lowered both answers' likelihood until greedy answers were
  gibberish ("Eu-Ladá, adapters. Yours-PA. Yours-LAD..."); with the SFT term they stayed sentences and signed off.

An explicit `learning_rate` replaces the scaled base rate; the multiplier resolved for it is then its ratio
to that rate, so `learning_rate = base * sqrt(batch / 8) * multiplier` holds for every resolved run
(gradient accumulation multiplies the batch here).
"""

import math

from pydantic import BaseModel

from training.config import TrainConfig

# Soft prompts and prefixes start from scratch and need far larger steps than weight updates.
BASE_LEARNING_RATE: dict[str, float] = {"lora": 1e-3, "prefix": 3e-2, "prompt": 3e-2, "bottleneck": 1e-3}
REFERENCE_BATCH_SIZE = 8
MAX_AUTO_BATCH_SIZE = 32
TARGET_EPOCHS, MAX_AUTO_EPOCHS = 3, 25
MIN_STEPS = 50  # below this, warmup and decay leave too few full-rate steps to learn a small dataset
MAX_EXAMPLES_SEEN = 25_000
AUTO_BETA, AUTO_SFT_WEIGHT = 0.1, 1.0


class Hyperparameters(BaseModel):
    """A run's resolved values (OpenAI's three names, and the peak learning rate they give)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    beta: float | None = None  # DPO runs only
    sft_weight: float | None = None  # DPO runs only


def auto_batch_size(num_examples: int) -> int:
    return min(MAX_AUTO_BATCH_SIZE, 2 ** round(math.log2(math.sqrt(max(num_examples, 1)))))


def steps_per_epoch(num_examples: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (the last batch may be short, and ends an accumulation early)."""
    return math.ceil(math.ceil(num_examples / batch_size) / accumulation)


def auto_epochs(num_examples: int, batch_size: int, accumulation: int) -> int:
    steps = max(1, steps_per_epoch(num_examples, batch_size, accumulation))
    epochs = min(MAX_AUTO_EPOCHS, max(TARGET_EPOCHS, math.ceil(MIN_STEPS / steps)))
    if num_examples * epochs > MAX_EXAMPLES_SEEN:
        epochs = max(1, MAX_EXAMPLES_SEEN // num_examples)
    return epochs


def resolve(config: TrainConfig, num_examples: int) -> Hyperparameters:
    """`config`'s hyperparameters for a training set of `num_examples`, every "auto" replaced."""
    batch_size = auto_batch_size(num_examples) if config.batch_size == "auto" else config.batch_size
    epochs = auto_epochs(num_examples, batch_size, config.gradient_accumulation_steps) \
        if config.epochs == "auto" else config.epochs
    base = BASE_LEARNING_RATE[config.method] * math.sqrt(batch_size * config.gradient_accumulation_steps
                                                          / REFERENCE_BATCH_SIZE)
    if config.learning_rate != "auto":
        multiplier, learning_rate = config.learning_rate / base, config.learning_rate
    else:
        multiplier = 1.0 if config.learning_rate_multiplier == "auto" else config.learning_rate_multiplier
        learning_rate = base * multiplier
    dpo = {}
    if config.objective == "dpo":
        dpo = {"beta": AUTO_BETA if config.beta == "auto" else config.beta,
               "sft_weight": AUTO_SFT_WEIGHT if config.sft_weight == "auto" else config.sft_weight}
    return Hyperparameters(n_epochs=epochs, batch_size=batch_size, learning_rate_multiplier=round(multiplier, 6),
                           learning_rate=min(learning_rate, 1.0), **dpo)
