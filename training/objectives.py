"""What a training step minimises: supervised fine-tuning (next-token loss on the assistant's tokens) or DPO
(direct preference optimisation over pairs of a preferred and a non-preferred answer).

DPO's reference model is the starting point, with no second copy of the base: the log-probabilities of every
answer under the base (before the adapter is attached), or under the adapter training continues (before its
first step), are computed once at the start (TRL's `precompute_ref_log_probs`) and kept beside the pairs. Loss
(Rafailov et al., 2023, as TRL's `sigmoid` loss): -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) -
(log pi(y_l) - log ref(y_l)))), plus `sft_weight` times the preferred answer's mean next-token loss (TRL's
`rpo_alpha`).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.config import TrainConfig
from training.data import IGNORE, Tokenized, batches, collate, load_dataset
from training.hyperparameters import Hyperparameters
from training.methods import Trainable
from training.preferences import PreferencePair, load_preferences


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens, and how many there are. A row at a time: a
    float32 copy of a whole batch's logits would take gigabytes at long lengths."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    sums = []
    for row in range(logits.shape[0]):
        scores = logits[row, :-1].float()
        picked = scores.gather(-1, targets[row].clamp(min=0)[:, None])[:, 0] - scores.logsumexp(-1)
        sums.append(picked.masked_fill(~mask[row], 0).sum())
    return torch.stack(sums), mask.sum(-1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, each pair's reward margin): a reward is beta times the answer's log-ratio to the reference."""
    margin = beta * ((chosen - reference_chosen) - (rejected - reference_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


class Objective:
    """What both objectives are given: the run's config, the tokenizer, the pad id and the device."""

    def __init__(self, config: TrainConfig, tokenizer: PreTrainedTokenizerBase, pad_id: int, device: torch.device):
        self.config, self.tokenizer, self.pad_id, self.device = config, tokenizer, pad_id, device
        self.hyper: Hyperparameters | None = None  # set once the run resolves its "auto" values


class SupervisedObjective(Objective):
    """Next-token loss on the assistant's tokens; metrics: loss and mean token accuracy (OpenAI's names)."""

    def load(self, path: Path) -> tuple[list[Tokenized], list[str]]:
        return load_dataset(path, self.tokenizer, self.config.max_seq_len)

    def prepare(self, model: nn.Module, datasets: list[list], batch_size: int, should_stop: Callable[[], bool], *,
                virtual: int = 0, autocast: Callable = contextlib.nullcontext) -> None:
        """Nothing to compute before training."""

    def step(self, trainable: Trainable, batch: list[Tokenized]) -> tuple[torch.Tensor, dict, int]:
        """(loss, the step's metrics, tokens fed)."""
        inputs = {k: v.to(self.device) for k, v in collate(batch, self.pad_id).items()}
        with trainable.autocast():
            out = trainable.model(**inputs)
        hits, count = self._correct_and_count(trainable, out.logits.detach(), inputs["labels"])
        return out.loss, {"mean_token_accuracy": hits / count}, int(inputs["attention_mask"].sum())

    @staticmethod
    def _correct_and_count(trainable: Trainable, logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """Next-token predictions that hit, and how many there were, over the assistant tokens of a batch."""
        logits = logits[:, trainable.num_virtual_tokens :]
        targets = labels[:, 1:]
        mask = targets != IGNORE
        return int((logits[:, :-1].argmax(-1) == targets)[mask].sum()), int(mask.sum())

    @torch.no_grad()
    def evaluate(self, trainable: Trainable, dataset: list[Tokenized], batch_size: int) -> dict:
        """Token-weighted loss and next-token accuracy over the assistant tokens."""
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches(dataset, batch_size):
            inputs = {k: v.to(self.device) for k, v in collate(batch, self.pad_id).items()}
            with trainable.autocast():
                out = trainable.model(**inputs)
            hits, n = self._correct_and_count(trainable, out.logits, inputs["labels"])
            loss_sum += float(out.loss) * n
            correct += hits
            count += n
        return {"loss": loss_sum / count, "mean_token_accuracy": correct / count}


@dataclass
class ScoredPair:
    """A preference pair and its answers' log-probabilities under the reference."""

    pair: PreferencePair
    reference: tuple[float, float] | None = None  # set by PreferenceObjective.prepare


class PreferenceObjective(Objective):
    """DPO; metrics: loss, reward margin (preferred over non-preferred) and preference accuracy (pairs whose
    margin is positive: the policy moved toward the preferred answer more than the reference had it)."""

    def load(self, path: Path) -> tuple[list[ScoredPair], list[str]]:
        pairs, warnings = load_preferences(path, self.tokenizer, self.config.max_seq_len)
        return [ScoredPair(pair) for pair in pairs], warnings

    def _forward(self, model: nn.Module, batch: list[ScoredPair], virtual: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(preferred answers' log-probs, non-preferred ones', preferred token counts) of one batch, in one pass."""
        rows = [s.pair.chosen for s in batch] + [s.pair.rejected for s in batch]
        inputs = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, virtual:]
        logps, counts = answer_logps(logits, labels)
        return logps[: len(batch)], logps[len(batch) :], counts[: len(batch)]

    @torch.no_grad()
    def prepare(self, model: nn.Module, datasets: list[list[ScoredPair]], batch_size: int,
                should_stop: Callable[[], bool], *, virtual: int = 0, autocast: Callable = contextlib.nullcontext
                ) -> None:
        """Every answer's log-probability under the reference `model` (the base, or the adapter training starts
        from, whose soft prompt takes `virtual` positions), once, before training; stops early if asked to."""
        was_training = model.training
        model.eval()
        try:
            for batch in (batch for dataset in datasets for batch in batches(dataset, batch_size)):
                if should_stop():
                    return
                with autocast():
                    chosen, rejected, _ = self._forward(model, batch, virtual)
                for scored, c, r in zip(batch, chosen.tolist(), rejected.tolist()):
                    scored.reference = (c, r)
        finally:
            model.train(was_training)

    def _loss(self, trainable: Trainable, batch: list[ScoredPair]) -> tuple[torch.Tensor, torch.Tensor, int]:
        with trainable.autocast():
            chosen, rejected, counts = self._forward(trainable.model, batch, trainable.num_virtual_tokens)
        reference = torch.tensor([s.reference for s in batch], device=chosen.device)
        loss, margin = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.hyper.beta)
        if self.hyper.sft_weight:
            loss = loss + self.hyper.sft_weight * (-chosen.sum() / counts.sum())
        tokens = sum(len(s.pair.chosen.input_ids) + len(s.pair.rejected.input_ids) for s in batch)
        return loss, margin, tokens

    def step(self, trainable: Trainable, batch: list[ScoredPair]) -> tuple[torch.Tensor, dict, int]:
        loss, margin, tokens = self._loss(trainable, batch)
        return loss, _margin_metrics(margin), tokens

    @torch.no_grad()
    def evaluate(self, trainable: Trainable, dataset: list[ScoredPair], batch_size: int) -> dict:
        losses, margins = [], []
        for batch in batches(dataset, batch_size):
            loss, margin, _ = self._loss(trainable, batch)
            losses.append(float(loss) * len(batch))
            margins.append(margin)
        return {"loss": sum(losses) / len(dataset), **_margin_metrics(torch.cat(margins))}


def _margin_metrics(margin: torch.Tensor) -> dict:
    return {"reward_margin": float(margin.mean()), "preference_accuracy": float((margin > 0).float().mean())}


def build_objective(config: TrainConfig, tokenizer: PreTrainedTokenizerBase, pad_id: int, device: torch.device
                    ) -> Objective:
    kind = PreferenceObjective if config.objective == "dpo" else SupervisedObjective
    return kind(config, tokenizer, pad_id, device)
