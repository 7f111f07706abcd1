"""Loads an HF causal LM and runs one padded forward pass over a contiguous range of cache slots."""

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from server.engine.kv_cache import ATTN_IMPLEMENTATION, KVBatch, SlotKVCache

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[dtype]


def eos_token_ids(model_path: Path, config) -> set[int]:
    """Every id that ends a turn: the generation config may list several (e.g. <|im_end|> and <|endoftext|>)."""
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    eos = eos if eos is not None else config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


class ModelRunner:
    def __init__(self, model_path: Path, *, device: str, dtype: str, max_model_len: int, max_num_seqs: int):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=ATTN_IMPLEMENTATION
        ).to(self.device).eval()
        config = self.model.config
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.eos_token_ids = eos_token_ids(model_path, config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotKVCache(
            config.num_hidden_layers, config.num_key_value_heads, head_dim,
            max_slots=max_num_seqs, max_len=max_model_len, dtype=self.dtype, device=self.device,
        )
        log.info("torch engine: %s on %s (%s)", model_path, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, first_slot: int, inputs: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Row i feeds `inputs[i]` at positions starts[i]... into slot first_slot + i.

        Rows are left-padded, so every row's last token is the last column and `logits_to_keep=1`
        computes the LM head for that token only. Returns logits (batch, vocab) in float32.
        """
        width = max(map(len, inputs))
        ids = torch.full((len(inputs), width), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros_like(ids)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        for row, (tokens, start) in enumerate(zip(inputs, starts)):
            n = len(tokens)
            ids[row, width - n :] = torch.tensor(tokens)
            positions[row, width - n :] = torch.arange(start, start + n)
            valid[row, width - n :] = True
        ids, positions, valid = ids.to(self.device), positions.to(self.device), valid.to(self.device)
        kv_batch = KVBatch.build(self.cache, first_slot, positions, valid)
        out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, kv_batch=kv_batch)
        return out.logits[:, -1].float()
