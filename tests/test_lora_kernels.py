"""The torch engine's two LoRA kernels agree with each row computed alone: rows of several slots, rows with
no LoRA, uneven groups, ranks padded to the stack's, and a layer whose stack is shorter than some slots; and
LoRAs of different ranks, each in its rank bucket's stack, mixed in one batch."""

import pytest
import torch

from server.engine.adapter_bank import AdapterBank, LoraRows, lora_bucket, lora_grouped, lora_masked
from adapters.lora import LoraAdapter, LoraWeights


@pytest.mark.parametrize("tokens", [1, 5])
def test_masked_and_grouped_lora_match_each_row_alone(tokens):
    torch.manual_seed(0)
    slots, rank, d_in, d_out = 6, 4, 24, 16
    a, b = torch.randn(slots + 1, rank, d_in), torch.randn(slots + 1, rank, d_out)
    a[0], b[0] = 0, 0  # slot 0: no adapter
    a[3, 2:], b[3, 2:] = 0, 0  # a rank-2 adapter, zero-padded to the stack's rank
    row_slots = [2, 0, 5, 2, 3, 2, 0, 5, 6]
    x = torch.randn(len(row_slots), tokens, d_in)
    expected = torch.stack([x[i] @ a[s].T @ b[s] for i, s in enumerate(row_slots)])

    rows = LoraRows.of(row_slots)
    assert rows.range == (2, 6) and rows.group_slots.tolist() == [2, 5, 3, 6] and rows.group_rows.shape == (4, 3)
    masked, grouped = torch.zeros_like(expected), torch.zeros_like(expected)
    lora_masked(x, masked, a[2:7], b[2:7], rows)
    lora_grouped(x, grouped, a, b, rows)
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(grouped, expected)

    # A layer only slots 0-4 target: the rows of slots 5 and 6 get nothing there.
    short = torch.zeros_like(expected)
    lora_grouped(x, short, a[:5], b[:5], rows)
    kept = (torch.tensor(row_slots) < 5)[:, None, None]
    torch.testing.assert_close(short, torch.where(kept, expected, torch.zeros_like(expected)))


def test_the_kernel_follows_the_batch_shape():
    rows = LoraRows.of([row % 16 + 1 for row in range(32)])
    fp32, bf16 = torch.float32, torch.bfloat16
    assert rows.is_grouped(tokens=7, rank=8, dtype=fp32) and rows.is_grouped(tokens=7, rank=8, dtype=bf16)
    assert rows.is_grouped(tokens=1, rank=8, dtype=fp32)  # decode, 16 slots x rank 8: 128 columns
    assert not rows.is_grouped(tokens=1, rank=8, dtype=bf16)  # CPU bf16 batched matmuls lose at decode
    few = LoraRows.of([row % 4 + 1 for row in range(32)])
    assert not few.is_grouped(tokens=1, rank=8, dtype=fp32) and few.is_grouped(tokens=1, rank=64, dtype=fp32)
    assert few.is_grouped(tokens=7, rank=8, dtype=fp32) and not few.is_grouped(tokens=7, rank=8, dtype=bf16)
    one = LoraRows.of([1] * 8)
    assert not one.is_grouped(tokens=64, rank=64, dtype=fp32)  # one slot: a plain matmul, nothing to group


def test_rank_buckets():
    assert [lora_bucket(r) for r in (1, 4, 8, 9, 16, 17, 64)] == [8, 8, 8, 16, 16, 32, 64]


@pytest.mark.parametrize("tokens", [1, 6])
def test_loras_of_mixed_ranks_share_a_batch_each_in_its_own_stack(tokens):
    """Ranks 4, 8, 12 and 64 (three buckets), batched with base rows, equal each row computed alone; the
    rank-64 LoRA does not widen the small ones' stack."""
    torch.manual_seed(0)
    d_in, d_out = 32, 24
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False))
    bank = AdapterBank(model, max_adapters=4, kv_dtype=torch.float32)
    ranks = {"r4": 4, "r8": 8, "r12": 12, "r64": 64, "r4b": 4}
    adapters = {name: LoraAdapter({"0": LoraWeights(torch.randn(r, d_in), torch.randn(d_out, r), 0.5)})
                for name, r in ranks.items()}
    for name, adapter in adapters.items():
        bank.load(name, adapter)
    wrapper = bank._lora_modules["0"]
    assert {bucket: a.shape[:2] for bucket, (a, _) in wrapper.stacks.items()} == {8: (4, 8), 16: (2, 16),
                                                                                 64: (2, 64)}
    order = ["r64", None, "r4", "r12", "r8", "r4b", "r64", None, "r4"]
    bank.bind([bank.acquire(name) if name else None for name in order])
    assert sorted(bank.rows.lora) == [8, 16, 64]
    x = torch.randn(len(order), tokens, d_in)
    with torch.no_grad():
        got = model(x)
        expected = torch.stack([
            model[0].base(x[i]) + (0 if name is None else
                                   0.5 * x[i] @ adapters[name].layers["0"].a.T @ adapters[name].layers["0"].b.T)
            for i, name in enumerate(order)])
    torch.testing.assert_close(got, expected)

    residents = dict(bank._by_name)
    for name in filter(None, order):
        bank.release(residents[name])
    bank.unload("r8")  # its slot is zeroed and given back to its bucket's pool only
    a, b = wrapper.stacks[8]
    assert bank._pool("lora", 8)[-1] == residents["r8"].slot and not a[residents["r8"].slot].any()
    assert bank._pool("lora", 64) == [4, 3, 2]
