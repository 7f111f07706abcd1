"""The torch engine's step (scheduler, model runner's sampling, output processor) over a fake forward pass:
which tokens each step feeds, in what order, and what every request gets, decided in milliseconds without
a model. The fake "model" answers each row with
a token that depends on every token of its sequence, so a wrong position, a lost or repeated token, or a
cached block of another sequence changes the output."""

import math

import torch
from prometheus_client import REGISTRY
from tokenizers import Tokenizer

from conftest import MODEL_PATH
from server.engine.base import GenerationOutput, GenerationRequest, SamplingParams
from server.engine.torch.engine_core import EngineCore
from server.engine.torch.kv_cache import PagedKVCache
from server.engine.torch.model_runner import ModelRunner
from server.engine.torch.scheduler import Scheduler
from server.engine.torch.residency import TorchResidency

VOCAB = 1000
BLOCK = 32


class FakeBank:
    def cache_root(self, resident, salt) -> bytes:
        return b"base"


class FakeRunner:
    """Keeps each sequence's tokens in its cache blocks (one number per position, in the pool's layer 0) and
    answers with a hash of all of them, as a real model's next token depends on the whole context."""

    def __init__(self, max_blocks: int, mixed_steps: bool):
        self.device, self.eos_token_ids, self.adapters = torch.device("cpu"), {0}, FakeBank()
        self.mixed_steps = mixed_steps  # the real runner's where vLLM's CPU attention kernel runs
        self.grammar_mask_budget_s = math.inf  # no request here is constrained
        self.cache = PagedKVCache(1, 1, 1, 4, budget_bytes=0, max_model_len=max_blocks * BLOCK, dtype=torch.float32,
                                  device=self.device)
        self.steps: list[list[tuple[int, int]]] = []  # per step: (first position, tokens fed) of each row
        self.packed: list[bool] = []  # per step: whether it came packed, one token a row

    execute = ModelRunner.execute  # the real sampling, over the fake forward pass below

    def forward_scoring(self, tables, inputs, starts, residents, full_rows, packed=False):
        self.steps.append([(start, len(tokens)) for tokens, start in zip(inputs, starts)])
        self.packed.append(packed)
        logits = torch.zeros(len(inputs), VOCAB)
        for row, (table, tokens, start) in enumerate(zip(tables, inputs, starts)):
            positions = torch.arange(start, start + len(tokens))
            blocks = torch.tensor(table)[positions // BLOCK]
            self.cache.keys[0][blocks, 0, positions % BLOCK, 0] = torch.tensor(tokens, dtype=torch.float32)
            seen = torch.arange(start + len(tokens))
            context = self.cache.keys[0][torch.tensor(table)[seen // BLOCK], 0, seen % BLOCK, 0]
            logits[row, 1 + int((context * torch.arange(1, len(context) + 1)).sum()) % (VOCAB - 1)] = 1.0
        return logits, {}


def _scheduler(max_blocks: int, budget: int, caching: bool = True, mixed: bool = False
               ) -> tuple[EngineCore, FakeRunner]:
    runner = FakeRunner(max_blocks, mixed)
    no_adapters = TorchResidency(None, 1, read=print, keep=print)  # these requests name none
    scheduler = Scheduler(runner, no_adapters, max_model_len=max_blocks * BLOCK, max_num_seqs=16,
                          max_num_batched_tokens=budget, enable_prefix_caching=caching)
    return EngineCore(scheduler, runner, Tokenizer.from_file(str(MODEL_PATH / "tokenizer.json"))), runner


def _run(core: EngineCore, prompts: list[list[int]], max_tokens: int, *, arrive_at: dict[int, int] | None = None,
         tenants: dict[int, str] | None = None, first_token_at: dict[int, int] | None = None) -> list[list[int]]:
    """Each prompt's generated tokens; prompt i joins at step arrive_at[i] (default: before the first), sent by
    tenants[i] (default ""); first_token_at, when given, gets the step each prompt's first token came in."""
    arrive_at, tenants, outputs = arrive_at or {}, tenants or {}, [[] for _ in prompts]
    first_token_at = {} if first_token_at is None else first_token_at

    def emitter(i: int):
        def emit(out: GenerationOutput) -> None:
            assert out.finish_reason != "error", out.error
            if out.token_ids:
                first_token_at.setdefault(i, step)
            outputs[i].extend(out.token_ids)
        return emit

    step = 0
    pending = dict(enumerate(prompts))
    while pending or core.scheduler.has_work:
        for i in [i for i in pending if arrive_at.get(i, 0) <= step]:
            request = GenerationRequest(f"r{i}", pending.pop(i), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                               ignore_eos=True), "m",
                                        tenant=tenants.get(i, ""))
            core.scheduler.add(core.new_sequence(request, emitter(i)))
        core.step()
        step += 1
    return outputs


def test_a_quiet_tenants_prompt_goes_before_another_tenants_backlog_of_long_prompts():
    """Fair queuing: one tenant's queued long prompts hold another's short one up by a step or two, not by
    their whole prefill; the steps while both are here are short (an eighth of the budget); answers are the
    same as alone."""
    for mixed in (True, False):
        core, runner = _scheduler(max_blocks=256, budget=256, mixed=mixed)
        prompts = [list(range(100 + i, 600 + i)) for i in range(6)] + [list(range(1, 11))]
        first = {}
        together = _run(core, prompts, max_tokens=4, arrive_at={6: 3}, tenants={6: "quiet"}, first_token_at=first)
        assert first[6] <= 3 + 3, (mixed, first)  # FIFO: after 3,000 tokens of the others' prefill
        assert min(first[i] for i in range(6)) < first[6]  # the long prompts were under way before it came
        shared = [sum(n for _, n in step if n > 1) for step in runner.steps[4:8]]
        assert max(shared) <= 256 // 8, (mixed, shared)
        alone = [_run(_scheduler(256, 4096)[0], [prompt], max_tokens=4)[0] for prompt in prompts]
        assert together == alone


def test_a_tenant_below_its_share_of_the_slots_takes_one_from_the_tenant_over_it():
    """16 slots all held by one tenant: a second tenant's request preempts the first tenant's newest
    sequence at once (not when one ends), and the preempted one still answers exactly as alone."""
    core, _ = _scheduler(max_blocks=256, budget=256, mixed=True)
    prompts = [[5 + i, 6, 7] for i in range(16)] + [[9, 9, 9]]
    first = {}
    together = _run(core, prompts, max_tokens=40, arrive_at={16: 3}, tenants={16: "quiet"}, first_token_at=first)
    assert first[16] <= 3 + 1, first
    alone = [_run(_scheduler(256, 4096)[0], [prompt], max_tokens=40)[0] for prompt in prompts]
    assert together == alone


def test_a_long_prompt_is_fed_in_chunks_that_take_turns_with_decode_steps():
    core, runner = _scheduler(max_blocks=64, budget=64)
    short, long = list(range(1, 11)), list(range(100, 300))
    together = _run(core, [short, long], max_tokens=12, arrive_at={1: 2})
    chunks = [row for step in runner.steps for row in step if row[1] > 1]
    assert chunks[1:] == [(0, 64), (64, 64), (128, 64), (192, 8)]  # after the short prompt's own prefill
    phases = ["prefill" if any(n > 1 for _, n in step) else "decode" for step in runner.steps[1:]]
    assert "prefill" not in [a for a, b in zip(phases, phases[1:]) if a == b]  # never two chunks in a row
    alone = [_run(_scheduler(64, 4096)[0], [prompt], max_tokens=12)[0] for prompt in (short, long)]
    assert together == alone


def test_where_the_runner_mixes_steps_prefill_chunks_ride_in_the_decode_steps():
    """vLLM v1's step: the decode rows first, then the chunk in the rest of the token budget."""
    core, runner = _scheduler(max_blocks=64, budget=64, mixed=True)
    short, long = list(range(1, 11)), list(range(100, 300))
    together = _run(core, [short, long], max_tokens=12, arrive_at={1: 2})
    with_chunks = [(step, packed) for step, packed in zip(runner.steps, runner.packed) if any(n > 1 for _, n in step)]
    assert with_chunks[0] == ([(0, 10)], False)  # the short prompt's prefill, alone (nothing decoded yet), padded
    assert with_chunks[1:] == [([(11 + i, 1), (63 * i, 63 if i < 3 else 11)], True) for i in range(4)]
    alone = [_run(_scheduler(64, 4096)[0], [prompt], max_tokens=12)[0] for prompt in (short, long)]
    assert together == alone


def test_decode_rows_that_fill_the_token_budget_leave_the_chunks_their_turns():
    """Mixed steps need room beside the decode rows: without it, chunks and decode steps take turns."""
    core, runner = _scheduler(max_blocks=64, budget=2, mixed=True)
    prompts = [[3, 4], [5, 6], list(range(100, 110))]
    together = _run(core, prompts, max_tokens=20, arrive_at={2: 3})
    with_chunks = [(step, packed) for step, packed in zip(runner.steps, runner.packed) if any(n > 1 for _, n in step)]
    # The first prompt's prefill, then the long one's chunks in prefill steps of their own, padded...
    assert with_chunks == [([(0, 2)], False)] + [([(2 * i, 2)], False) for i in range(5)]
    assert any(len(step) == 3 for step in runner.steps)  # ...while the others still decode: it joins them
    alone = [_run(_scheduler(64, 4096)[0], [prompt], max_tokens=20)[0] for prompt in prompts]
    assert together == alone


def test_a_cached_prefix_is_not_fed_again_and_gives_the_same_tokens():
    system = list(range(500, 600))  # three full blocks and a few tokens
    prompts = [system + [7, 8, 9], system + [10, 11]]
    core, runner = _scheduler(max_blocks=64, budget=4096)
    cached = _run(core, prompts, max_tokens=5, arrive_at={1: 10})
    second_prefill = [row for step in runner.steps for row in step if row[1] > 1][1]
    assert second_prefill == (96, len(prompts[1]) - 96)
    cold = _run(_scheduler(64, 4096, caching=False)[0], prompts, max_tokens=5, arrive_at={1: 10})
    assert cached == cold


def test_a_full_pool_preempts_and_every_sequence_gets_its_own_tokens():
    prompts = [[i] * 20 for i in range(1, 6)]
    core, runner = _scheduler(max_blocks=8, budget=4096)
    preempted = REGISTRY.get_sample_value("swapyard_engine_preemptions_total")
    squeezed = _run(core, prompts, max_tokens=60)
    assert REGISTRY.get_sample_value("swapyard_engine_preemptions_total") > preempted
    assert runner.cache.num_used == 0
    roomy = _run(_scheduler(max_blocks=64, budget=4096)[0], prompts, max_tokens=60)
    assert squeezed == roomy and all(len(tokens) == 60 for tokens in squeezed)
