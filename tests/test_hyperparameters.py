"""The "auto" hyperparameter rule: enough optimizer steps for a small dataset, a bounded run for a large one,
and the learning rate scaled with the square root of the batch and by the multiplier."""

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from training.config import TrainConfig
from training.hyperparameters import BASE_LEARNING_RATE, resolve


def _config(**fields) -> TrainConfig:
    return TrainConfig(data=Path("data.jsonl"), out=Path("out"), **{"method": "lora", **fields})


@pytest.mark.parametrize("examples, batch_size, epochs", [
    (0, 1, 25),         # an empty file fails validation; the rule still answers
    (1, 1, 25),         # one example: as many epochs as allowed, still under 50 steps
    (20, 4, 10),        # the shipped mascot data: 5 steps an epoch, raised to 50 steps
    (300, 16, 3),       # 19 steps an epoch: OpenAI's 3 epochs reach 57 steps
    (1000, 32, 3),
    (20_000, 32, 1),    # 25,000 examples seen at most
])
def test_auto_epochs_and_batch_size_follow_the_dataset(examples, batch_size, epochs):
    resolved = resolve(_config(), examples)
    assert (resolved.batch_size, resolved.n_epochs) == (batch_size, epochs)
    assert resolved.learning_rate_multiplier == 1.0


@pytest.mark.parametrize("method", list(BASE_LEARNING_RATE))
def test_learning_rate_grows_with_the_square_root_of_the_batch_and_the_multiplier(method):
    small, large = resolve(_config(method=method), 20), resolve(_config(method=method), 1000)
    assert large.learning_rate / small.learning_rate == pytest.approx(math.sqrt(32 / 4))
    doubled = resolve(_config(method=method, learning_rate_multiplier=2), 20)
    assert doubled.learning_rate == pytest.approx(2 * small.learning_rate)
    assert small.learning_rate == pytest.approx(BASE_LEARNING_RATE[method] * math.sqrt(4 / 8))


def test_explicit_values_win_and_report_their_multiplier():
    resolved = resolve(_config(epochs=2, batch_size=8, learning_rate=2e-3), 20)
    assert (resolved.n_epochs, resolved.batch_size, resolved.learning_rate) == (2, 8, 2e-3)
    assert resolved.learning_rate_multiplier == pytest.approx(2.0)  # against LoRA's 1e-3 at batch 8
    with pytest.raises(ValidationError, match="learning_rate or learning_rate_multiplier"):
        _config(learning_rate=1e-3, learning_rate_multiplier=2)
