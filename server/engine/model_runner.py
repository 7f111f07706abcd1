"""Loads an HF causal LM; runs one step's padded forward pass over sequences of the paged KV cache and
samples the next token of each row that is ready for one."""

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from adapters.prefix import PrefixAdapter
from adapters.prompt import PromptAdapter
from server.engine.adapter_bank import AdapterBank, Resident
from server.engine.kv_cache import ATTN_IMPLEMENTATION, KVBatch, PagedKVCache
from server.engine.packed_linear import pack_linears
from server.engine.sampler import apply_logit_changes, logprobs_of, sample
from server.engine.sequence import SampledBatch, ScheduledBatch
from server.host import detect_host, dtype_name, resolve_device, resolve_dtype
from server.metrics import ENGINE_INFO
from server.structured import mask_to_grammars

log = logging.getLogger(__name__)


def eos_token_ids(model_path: Path, config) -> set[int]:
    """Every id that ends a turn: the generation config may list several (e.g. <|im_end|> and <|endoftext|>)."""
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    eos = eos if eos is not None else config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


class ModelRunner:
    def __init__(self, model_path: Path, *, device: str, dtype: str, max_model_len: int, kv_cache_bytes: int,
                 max_resident_adapters: int, prepack_weights: bool = False):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=ATTN_IMPLEMENTATION
        ).to(self.device).eval()
        packed = pack_linears(self.model) if prepack_weights and self.device.type == "cpu" else 0
        config = self.model.config
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.eos_token_ids = eos_token_ids(model_path, config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # On a CPU the KV cache (and so attention) stays float32 whatever the weights: torch's CPU flash
        # attention is about 9x slower in bf16 than in fp32 at decode shapes (1.9 vs 0.2 ms, 32 rows x 100
        # keys), which ate most of what bf16 matmuls gain. It is small next to the weights at these lengths.
        kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.cache = PagedKVCache(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                                  head_dim, budget_bytes=kv_cache_bytes, max_model_len=max_model_len, dtype=kv_dtype,
                                  device=self.device)
        self.adapters = AdapterBank(self.model, max_resident_adapters, kv_dtype)
        host = detect_host()
        log.info("torch engine: %s on %s in %s (dtype %s; CPU %s, %s; %d linear layers prepacked for oneDNN)",
                 model_path, self.device, dtype_name(self.dtype), dtype, host.cpu_model, host.isa, packed)
        ENGINE_INFO.labels("torch").info({"device": self.device.type, "dtype": dtype_name(self.dtype),
                          "requested_dtype": dtype, "cpu_isa": host.isa})

    def write_prefix(self, blocks: list[int], adapter: PrefixAdapter) -> None:
        """Prefix tuning: the learned keys/values become the first cache positions of the sequence."""
        self.cache.write(blocks, adapter.keys, adapter.values)

    def execute(self, batch: ScheduledBatch) -> SampledBatch:
        """The step's forward pass, then each sampled row's logits processed (penalties, biases, grammar
        masks) and its next token drawn from its own generator."""
        seqs = batch.sequences
        scored = tuple(i for i, s in enumerate(seqs) if s.is_scoring_prompt)
        logits, full = self.forward_scoring([s.blocks for s in seqs], batch.inputs, [s.computed for s in seqs],
                                            [s.resident for s in seqs], scored)
        rows = batch.sampled_rows
        if not rows:
            return SampledBatch([], [], [], full)
        seqs, logits = [seqs[i] for i in rows], logits[rows]
        params = [s.request.sampling for s in seqs]
        changed = apply_logit_changes(logits, params, [(s.request.prompt_token_ids, s.generated) for s in seqs],
                                      self.eos_token_ids)
        tokens = sample(mask_to_grammars(changed, [s.matcher for s in seqs]), params, [s.generator for s in seqs])
        return SampledBatch(rows, tokens, logprobs_of(logits, tokens, params), full)

    def forward(self, tables: list[list[int]], inputs: list[list[int]], starts: list[int],
                residents: list[Resident | None]) -> torch.Tensor:
        """Row i feeds `inputs[i]` at positions starts[i]... into the blocks tables[i], with its own adapter.

        Rows are left-padded, so every row's last token is the last column and `logits_to_keep=1`
        computes the LM head for that token only. A negative id -k-1 stands for soft-prompt row k of the
        row's prompt-tuning adapter. Returns logits (batch, vocab) in float32.
        """
        return self.forward_scoring(tables, inputs, starts, residents, ())[0]

    @torch.inference_mode()
    def forward_scoring(self, tables: list[list[int]], inputs: list[list[int]], starts: list[int],
                        residents: list[Resident | None], full_rows: tuple[int, ...]
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`forward`, plus the logits at every input position (len(inputs[row]), vocab) of each row in
        `full_rows` (prompt logprobs): the LM head runs on those rows' final hidden states only, caught
        from the decoder, since the whole batch's (batch, width, vocab) logits would take gigabytes."""
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
        kv_batch = KVBatch.build(self.cache, tables, positions, valid)
        self.adapters.bind(residents)
        hidden: list[torch.Tensor] = []
        hook = self.model.base_model.register_forward_hook(
            lambda _module, _args, out: hidden.append(out.last_hidden_state)) if full_rows else None
        try:
            out = self.model(**self._embed(ids, residents), position_ids=positions, use_cache=False,
                             logits_to_keep=1, kv_batch=kv_batch)
        finally:
            if hook is not None:
                hook.remove()
        head, full = self.model.get_output_embeddings(), {}
        for row in full_rows:  # one row at a time, bound to its own adapter (a LoRA may target the head)
            self.adapters.bind([residents[row]])
            full[row] = head(hidden[0][row : row + 1, width - len(inputs[row]) :])[0].float()
        return out.logits[:, -1].float(), full

    def _embed(self, ids: torch.Tensor, residents: list[Resident | None]) -> dict[str, torch.Tensor]:
        """Token ids, or input embeddings when some row carries soft-prompt positions."""
        soft = ids < 0
        if not soft.any():
            return {"input_ids": ids}
        embeds = self.model.get_input_embeddings()(ids.clamp(min=0))
        for row, resident in enumerate(residents):
            if resident is not None and isinstance(resident.adapter, PromptAdapter) and soft[row].any():
                embeds[row, soft[row]] = resident.adapter.embeddings[-1 - ids[row, soft[row]]]
        return {"inputs_embeds": embeds}
