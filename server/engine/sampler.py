"""Next-token choice for a batch whose rows each carry their own sampling parameters."""

import torch

from server.engine.base import SamplingParams


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


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits (batch, vocab) float32 -> one token id per row."""
    chosen = logits.argmax(dim=-1).tolist()
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled_rows:
        return chosen
    rows = torch.tensor(sampled_rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
    sorted_logits, sorted_ids = (logits[rows] / temps[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    top_k = torch.tensor([params[i].top_k or logits.shape[1] for i in sampled_rows], device=logits.device)
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=logits.device)
    # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
    cut = (ranks[None, :] >= top_k[:, None]) | (probs.cumsum(dim=-1) - probs >= top_p[:, None])
    probs = probs.masked_fill(cut, 0.0)
    for j, i in enumerate(sampled_rows):
        pick = torch.multinomial(probs[j], 1, generator=generators[i])
        chosen[i] = int(sorted_ids[j, pick])
    return chosen
