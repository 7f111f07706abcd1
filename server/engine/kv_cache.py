"""Slot KV cache of the torch engine, plugged into transformers as a custom attention function.

Each running sequence owns one slot (a row of the cache); the scheduler keeps the slots of a batch
contiguous, so attention reads the cache through a view instead of gathering it every step.
Any HF model whose attention layers call `ALL_ATTENTION_FUNCTIONS` (Llama, Qwen, Mistral, ...) runs
on it unchanged: we pass `use_cache=False`, and this function writes and reads the cache itself.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "swapyard_slots"


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class SlotKVCache:
    """K and V of shape (layers, slots, kv_heads, capacity, head_dim), grown by doubling on demand."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, max_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        self.max_slots, self.max_len = max_slots, max_len
        self._shape = (num_layers, num_kv_heads, head_dim)
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.k = torch.empty(num_layers, 0, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def _rounded(self, num_slots: int, length: int) -> tuple[int, int]:
        return min(_next_pow2(num_slots), self.max_slots), min(_next_pow2(length), self.max_len)

    def bytes_needed(self, num_slots: int, length: int) -> int:
        slots, cap = self._rounded(max(num_slots, self.k.shape[1]), max(length, self.k.shape[3]))
        return slots * cap * self.bytes_per_token

    def ensure(self, num_slots: int, length: int) -> None:
        """Make room for `num_slots` sequences of up to `length` tokens, keeping what is stored."""
        old_slots, old_cap = self.k.shape[1], self.k.shape[3]
        if num_slots <= old_slots and length <= old_cap:
            return
        slots, cap = self._rounded(max(num_slots, old_slots), max(length, old_cap))
        layers, heads, dim = self._shape
        for name in ("k", "v"):
            old = getattr(self, name)
            # zeros, not empty: a row's attention reads the masked positions up to the batch's longest row,
            # and recycled memory may hold NaN or inf, which poisons the row even at zero weight (0 * NaN).
            # The KV budget (--kv-cache-memory-gb) bounds what this commits.
            new = torch.zeros(layers, slots, heads, cap, dim, dtype=old.dtype, device=old.device)
            new[:, :old_slots, :, :old_cap] = old
            setattr(self, name, new)

    def clear(self, slot: int | None = None) -> None:
        """Zero a slot (None: all) whose sequence failed: its values may be non-finite, and other rows read
        masked positions, where they must find zeros."""
        rows = slice(None) if slot is None else slice(slot, slot + 1)
        self.k[:, rows].zero_()
        self.v[:, rows].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first `length` positions to another slot (compaction after a finish)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class KVBatch:
    """Where one forward pass writes its new keys/values and what each query may attend to."""

    cache: SlotKVCache
    first_slot: int
    num_rows: int
    write_rows: torch.Tensor  # [num_valid_tokens] row of each new token
    write_pos: torch.Tensor  # [num_valid_tokens] its position
    valid: torch.Tensor  # [batch, new_tokens] False on padding
    kv_len: int
    mask: torch.Tensor  # [batch, 1, new_tokens, kv_len] query at position p sees keys 0..p

    @classmethod
    def build(cls, cache: SlotKVCache, first_slot: int, positions: torch.Tensor, valid: torch.Tensor) -> "KVBatch":
        kv_len = int(positions[valid].max()) + 1
        keys = torch.arange(kv_len, device=positions.device)
        mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        return cls(cache, first_slot, positions.shape[0], rows[valid], positions[valid], valid, kv_len, mask)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv_batch=None, **_):
    """query (batch, heads, new, dim); key/value (batch, kv_heads, new, dim) after RoPE."""
    b = kv_batch
    rows = slice(b.first_slot, b.first_slot + b.num_rows)
    k_cache = b.cache.k[module.layer_idx, rows]  # (batch, kv_heads, capacity, dim), a view
    v_cache = b.cache.v[module.layer_idx, rows]
    k_cache[b.write_rows, :, b.write_pos] = key.transpose(1, 2)[b.valid].to(k_cache.dtype)
    v_cache[b.write_rows, :, b.write_pos] = value.transpose(1, 2)[b.valid].to(v_cache.dtype)
    # Attention runs in the cache's dtype, which may be wider than the model's (float32 on CPUs).
    out = F.scaled_dot_product_attention(
        query.to(k_cache.dtype), k_cache[:, :, : b.kv_len], v_cache[:, :, : b.kv_len], attn_mask=b.mask,
        scale=scaling, enable_gqa=True,
    )
    return out.transpose(1, 2).to(query.dtype), None  # (batch, new, heads, dim), as transformers expects


AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
