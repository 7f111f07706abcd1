"""Next-token choice for a batch whose rows each carry their own sampling parameters.

A row that cannot be sampled (non-finite logits, a sampler error) fails alone: its result is None and
every other row of the batch gets the token it would have got on its own.
"""

import logging

import torch

from server.engine.base import SamplingParams, TokenLogprob

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


def apply_logit_changes(logits: torch.Tensor, params: list[SamplingParams],
                        histories: list[tuple[list[int], list[int]]], end_token_ids: set[int]) -> torch.Tensor:
    """min_tokens, logit_bias and the penalties, for the rows that ask (a copy; untouched when none does).
    histories[i]: row i's (prompt token ids, generated token ids)."""
    rows = [i for i, p in enumerate(params) if p.changes_logits]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        p, (prompt, generated), row = params[i], histories[i], logits[i]
        if len(generated) < p.min_tokens:
            row[sorted(end_token_ids | set(p.stop_token_ids))] = -torch.inf
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            row[list(ids)] += torch.tensor(bias, device=row.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(generated)), device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if generated and (p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.tensor(generated, device=row.device).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return logits


def logprobs_of(logits: torch.Tensor, tokens: list[int | None],
                params: list[SamplingParams]) -> list[TokenLogprob | None]:
    """Per row that asked: the chosen token's logprob under the raw distribution, and the top `logprobs`."""
    rows = [i for i, (p, t) in enumerate(zip(params, tokens)) if p.logprobs is not None and t is not None]
    out: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return out
    logprobs = logits[rows].log_softmax(dim=-1)
    k = max(params[i].logprobs for i in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))
    for j, i in enumerate(rows):
        n = params[i].logprobs
        out[i] = TokenLogprob(tokens[i], float(chosen[j, 0]),
                              list(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist())))
    return out


def prompt_logprobs_of(logits: torch.Tensor, prompt: list[int], num_top: int) -> list[TokenLogprob]:
    """logits (len(inputs), vocab) of one row whose inputs end with `prompt`: each prompt token's logprob
    under the raw distribution at the position before it, and the top `num_top` there."""
    before = logits[len(logits) - len(prompt) : -1].log_softmax(dim=-1)  # predicts prompt[1:]
    chosen = before.gather(1, torch.tensor(prompt[1:], device=logits.device)[:, None])[:, 0].tolist()
    top_values, top_ids = before.topk(num_top, dim=-1) if num_top else (before[:, :0], before[:, :0].long())
    return [TokenLogprob(prompt[0], None, [])] + [
        TokenLogprob(token, lp, list(zip(ids, values)))
        for token, lp, ids, values in zip(prompt[1:], chosen, top_ids.tolist(), top_values.tolist())]


# Tokens ranked per sampled row before a full sort of the vocabulary is needed: top-k, top-p and min-p keep a
# prefix of the ranking, and once the last of these candidates is cut every later token is too. Sorting a
# 49,152-token vocabulary for 32 rows took 71 ms on a 2-core CPU, their top 256 3.4 ms (and a draw over the
# whole vocabulary 1.3 ms a row, over the kept tokens 0.03 ms).
CANDIDATES = 256


def _filtered(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs (rows, n) of each row's best tokens in descending order (normalized over the whole vocabulary),
    zero where top-k, top-p or min-p cut them. A token goes when the tokens ranked above it already hold top_p
    of the mass, or when it is less likely than min_p x the top token; the first always stays (a top_p that
    rounds to 0 in float32 would otherwise cut every token)."""
    ranks = torch.arange(probs.shape[1], device=probs.device)
    cut = (ranks[None, :] >= top_k[:, None]) | (probs.cumsum(dim=-1) - probs >= top_p[:, None])
    cut |= probs < min_p[:, None] * probs[:, :1]
    cut[:, 0] = False
    return probs.masked_fill(cut, 0.0)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index of `probs` (not normalized; zeros are never drawn) by inverse transform, from one uniform
    number of the row's own generator, so a seeded row draws alike in any batch."""
    cdf = probs.cumsum(dim=0)
    total = cdf[-1]
    if not (total > 0 and total.isfinite()):
        raise RuntimeError(f"no probability mass to sample from ({total.item()})")
    u = torch.rand((), generator=generator, device=probs.device, dtype=cdf.dtype) * total
    return min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | None]:
    """logits (batch, vocab) float32 -> one token id per row, None for a row that could not be sampled."""
    # A row fails on NaN or +inf logits (an adapter that overflowed); -inf is a barred token (min_tokens),
    # but a row with every token barred has nothing to give.
    # One reduction tells both: a row's max is NaN if any logit is, +inf if any is, -inf if all are.
    best, best_ids = logits.max(dim=-1)  # the first of tied maxima, as argmax
    is_finite = best.isfinite().tolist()
    chosen: list[int | None] = [t if ok else None for t, ok in zip(best_ids.tolist(), is_finite)]
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy and is_finite[i]]
    if not sampled_rows:
        return chosen
    vocab, device = logits.shape[1], logits.device
    temps = torch.tensor([params[i].temperature for i in sampled_rows], device=device)
    # Indexing copies the batch's logits (3.6 ms for 32 rows): only when some rows are greedy or failed.
    some = logits if len(sampled_rows) == len(logits) else logits[torch.tensor(sampled_rows, device=device)]
    scaled = some / temps[:, None]
    log_total = scaled.logsumexp(dim=-1, keepdim=True)
    top_k = torch.tensor([params[i].top_k or vocab for i in sampled_rows], device=device)
    top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=device)
    min_p = torch.tensor([params[i].min_p for i in sampled_rows], device=device)
    values, ids = scaled.topk(min(CANDIDATES, vocab), dim=-1)
    kept = _filtered((values - log_total).exp(), top_k, top_p, min_p)
    # Rows that cut nothing draw from the whole distribution as it is, unsorted; rows whose last candidate
    # stays may keep later tokens too, so they rank the whole vocabulary (in one sort).
    is_whole = [(params[i].top_k == 0 or params[i].top_k >= vocab) and params[i].top_p == 1.0
                and params[i].min_p == 0.0 for i in sampled_rows]
    last_stays = (kept[:, -1] > 0).tolist()  # one read of the batch, not one per row
    wide = {j: n for n, j in enumerate(j for j, whole in enumerate(is_whole)
                                       if not whole and vocab > CANDIDATES and last_stays[j])}
    if wide:
        rows = list(wide)
        ranked, ranked_ids = scaled[rows].sort(dim=-1, descending=True)
        ranked_probs = _filtered((ranked - log_total[rows]).exp(), top_k[rows], top_p[rows], min_p[rows])
    for j, i in enumerate(sampled_rows):
        if is_whole[j]:
            row_probs, row_ids = (scaled[j] - log_total[j]).exp(), None
        elif j in wide:
            row_probs, row_ids = ranked_probs[wide[j]], ranked_ids[wide[j]]
        else:
            row_probs, row_ids = kept[j], ids[j]
        try:
            index = _draw(row_probs, generators[i])
        except RuntimeError:  # e.g. a row of non-finite probabilities: this row fails, not the batch
            log.exception("sampling failed for one row")
            chosen[i] = None
            continue
        chosen[i] = index if row_ids is None else int(row_ids[index])
    return chosen
