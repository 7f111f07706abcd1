"""Next-token choice for a batch whose rows each carry their own sampling parameters.

A row that cannot be sampled (non-finite logits, a sampler error) fails alone: its result is None and
every other row of the batch gets the token it would have got on its own.
"""

import logging

import torch

from server.engine.base import SamplingParams

log = logging.getLogger(__name__)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request samples the same tokens whatever it is batched with."""
    if params.is_greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | None]:
    """logits (batch, vocab) float32 -> one token id per row, None for a row that could not be sampled."""
    is_finite = torch.isfinite(logits).all(dim=-1).tolist()
    chosen: list[int | None] = [t if ok else None for t, ok in zip(logits.argmax(dim=-1).tolist(), is_finite)]
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy and is_finite[i]]
    if not sampled_rows:
        return chosen
    rows = torch.tensor(sampled_rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
    sorted_logits, sorted_ids = (logits[rows] / temps[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    top_k = torch.tensor([params[i].top_k or logits.shape[1] for i in sampled_rows], device=logits.device)
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=logits.device)
    # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays
    # (a top_p that rounds to 0 in float32 would otherwise cut every token).
    cut = (ranks[None, :] >= top_k[:, None]) | (probs.cumsum(dim=-1) - probs >= top_p[:, None])
    cut[:, 0] = False
    probs = probs.masked_fill(cut, 0.0)
    for j, i in enumerate(sampled_rows):
        try:
            pick = torch.multinomial(probs[j], 1, generator=generators[i])
        except RuntimeError:  # e.g. a row of non-finite probabilities: this row fails, not the batch
            log.exception("sampling failed for one row")
            chosen[i] = None
            continue
        chosen[i] = int(sorted_ids[j, pick])
    return chosen
