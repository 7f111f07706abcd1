"""The torch engine's two LoRA kernels agree with each row computed alone: rows of several slots, rows with
no LoRA, uneven groups, ranks padded to the widest, and a layer whose stack is shorter than some slots."""

import pytest
import torch

from server.engine.adapter_bank import RowAdapters, lora_grouped, lora_masked


@pytest.mark.parametrize("tokens", [1, 5])
def test_masked_and_grouped_lora_match_each_row_alone(tokens):
    torch.manual_seed(0)
    slots, rank, d_in, d_out = 6, 4, 24, 16
    a, b = torch.randn(slots + 1, rank, d_in), torch.randn(slots + 1, rank, d_out)
    a[0], b[0] = 0, 0  # slot 0: no adapter
    a[3, 2:], b[3, 2:] = 0, 0  # a rank-2 adapter, zero-padded to the stack's rank
    row_slots = torch.tensor([2, 0, 5, 2, 3, 2, 0, 5, 6])
    x = torch.randn(len(row_slots), tokens, d_in)
    expected = torch.stack([x[i] @ a[s].T @ b[s] for i, s in enumerate(row_slots.tolist())])

    rows = RowAdapters(lora=row_slots, lora_range=(2, 6))
    rows.group_lora_rows()
    assert rows.lora_group_slots.tolist() == [2, 5, 3, 6] and rows.lora_group_rows.shape == (4, 3)
    masked, grouped = torch.zeros_like(expected), torch.zeros_like(expected)
    lora_masked(x, masked, a[2:7], b[2:7], rows)
    lora_grouped(x, grouped, a, b, rows)
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(grouped, expected)

    # A layer only slots 0-4 target: the rows of slots 5 and 6 get nothing there.
    short = torch.zeros_like(expected)
    lora_grouped(x, short, a[:5], b[:5], rows)
    kept = (row_slots < 5)[:, None, None]
    torch.testing.assert_close(short, torch.where(kept, expected, torch.zeros_like(expected)))


def test_the_kernel_follows_the_batch_shape():
    rows = RowAdapters(lora=torch.arange(32) % 16 + 1, lora_range=(1, 16))
    rows.group_lora_rows()
    fp32, bf16 = torch.float32, torch.bfloat16
    assert rows.is_lora_grouped(tokens=7, rank=8, dtype=fp32) and rows.is_lora_grouped(tokens=7, rank=8, dtype=bf16)
    assert rows.is_lora_grouped(tokens=1, rank=8, dtype=fp32)  # decode, 16 slots x rank 8: 128 columns
    assert not rows.is_lora_grouped(tokens=1, rank=8, dtype=bf16)  # CPU bf16 batched matmuls lose at decode
    few = RowAdapters(lora=torch.arange(32) % 4 + 1, lora_range=(1, 4))
    few.group_lora_rows()
    assert not few.is_lora_grouped(tokens=1, rank=8, dtype=fp32) and few.is_lora_grouped(tokens=1, rank=64, dtype=fp32)
    assert few.is_lora_grouped(tokens=7, rank=8, dtype=fp32) and not few.is_lora_grouped(tokens=7, rank=8, dtype=bf16)
    one = RowAdapters(lora=torch.ones(8, dtype=torch.long), lora_range=(1, 1))
    one.group_lora_rows()
    assert not one.is_lora_grouped(tokens=64, rank=64, dtype=fp32)  # one slot: a plain matmul, nothing to group
