"""The sampler ranks only each row's best CANDIDATES tokens unless its top-k / top-p / min-p cut reaches past
them: whichever path a row takes, it keeps exactly the tokens a full sort of the vocabulary keeps, draws them
in proportion, and a seeded row draws the same tokens in any batch."""

import torch

from server.engine.base import SamplingParams
from server.engine.torch.sampler import CANDIDATES, make_generator, sample

VOCAB = 4 * CANDIDATES
CPU = torch.device("cpu")


def _params(**fields) -> SamplingParams:
    return SamplingParams(max_tokens=1, **fields)


def _reference(logits: torch.Tensor, p: SamplingParams) -> dict[int, float]:
    """The kept tokens and their renormalized probabilities, by the definition: a full sort, then top-k, then
    a token goes once those above it hold top_p, or below min_p x the top's probability; the first stays."""
    probs = (logits / p.temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = {}, 0.0
    for rank, token in enumerate(order):
        q = probs[token].item()
        if rank and ((p.top_k and rank >= p.top_k) or mass >= p.top_p or q < p.min_p * probs[order[0]].item()):
            break
        kept[token], mass = q, mass + q
    return {token: q / mass for token, q in kept.items()}


def _rows() -> tuple[torch.Tensor, list[SamplingParams]]:
    gen = torch.Generator().manual_seed(0)
    peaked = torch.randn(VOCAB, generator=gen)
    peaked[:4] += torch.tensor([9.0, 8.5, 8.0, 7.0])  # a few tokens hold nearly all the mass
    flat = torch.randn(VOCAB, generator=gen) * 0.1  # the nucleus spans most of the vocabulary
    rows = [(peaked, _params(temperature=0.7, top_p=0.9)),  # fits in the candidates
            (peaked, _params(temperature=1.0, top_k=3)),
            (peaked, _params(temperature=1.0, min_p=0.2)),
            (flat, _params(temperature=1.0, top_p=0.99)),  # reaches past them: the whole vocabulary is ranked
            (flat, _params(temperature=1.5, top_k=CANDIDATES + 10)),
            (peaked, _params(temperature=1.0))]  # cuts nothing
    return torch.stack([logits for logits, _ in rows]), [p for _, p in rows]


def test_every_path_keeps_the_reference_tokens_and_draws_them_in_proportion():
    logits, params = _rows()
    generators = [make_generator(_params(temperature=1.0, seed=row), CPU) for row in range(len(params))]
    draws = [sample(logits, params, generators) for _ in range(3000)]
    for row, p in enumerate(params):
        reference = _reference(logits[row], p)
        counts: dict[int, int] = {}
        for tokens in draws:
            counts[tokens[row]] = counts.get(tokens[row], 0) + 1
        assert counts.keys() <= reference.keys(), (row, p)
        if row in (3, 4):  # hundreds of kept tokens: the whole set cannot show in 3,000 draws
            assert len(counts) > CANDIDATES, row
        for token, q in reference.items():
            if q > 0.05:
                assert abs(counts.get(token, 0) / len(draws) - q) < 0.04, (row, token, q)


def test_a_seeded_row_draws_the_same_tokens_in_any_batch():
    logits, params = _rows()
    failed = torch.full((VOCAB,), float("nan"))
    greedy = _params(temperature=0.0)

    def draws(batch: list[int], extra: bool) -> list[list[int | None]]:
        rows = torch.stack([logits[i] for i in batch] + ([failed, logits[0]] if extra else []))
        ps = [params[i] for i in batch] + ([params[0], greedy] if extra else [])
        generators = [make_generator(_params(temperature=1.0, seed=7 + i), CPU) for i in batch]
        generators += [make_generator(_params(temperature=1.0, seed=1), CPU), None] if extra else []
        return [sample(rows, ps, generators)[: len(batch)] for _ in range(20)]

    for row in range(len(params)):
        assert draws([row], extra=False) == [tokens[row:row + 1] for tokens in draws(list(range(len(params))),
                                                                                    extra=True)], row
    together = sample(torch.stack([failed, logits[0]]), [params[0], greedy], [make_generator(params[0], CPU), None])
    assert together == [None, int(logits[0].argmax())]
