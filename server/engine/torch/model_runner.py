"""Loads an HF causal LM; runs one step's forward pass over sequences of the paged KV cache (padded, or packed
one token a row) and samples the next token of each sequence that is ready for one."""

import itertools
import logging
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from server.engine.torch.adapter_bank import AdapterBank, Resident
from server.engine.torch.fused_norms import fuse_norms
from server.engine.torch.kv_cache import ATTN_IMPLEMENTATION, KVBatch, PagedKVCache, cache_dtype
from server.engine.torch.packed_linear import ROW_TILE, pack_linears, tile_linears
from server.engine.torch.sampler import apply_logit_changes, logprobs_of, sample
from server.engine.torch.sequence import SampledBatch, ScheduledBatch
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
                 max_resident_adapters: int, grammar_mask_budget_s: float = math.inf,
                 prepack_weights: bool = True, batch_invariant: bool = False, kv_cache_dtype: str = "auto",
                 fused_norms: bool = True):
        self.device = resolve_device(device)
        self.grammar_mask_budget_s = grammar_mask_budget_s
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=ATTN_IMPLEMENTATION
        ).to(self.device).eval()
        on_cpu = self.device.type == "cpu"
        packed = pack_linears(self.model) if prepack_weights and on_cpu else 0
        fused = fuse_norms(self.model) if fused_norms and on_cpu else 0
        if batch_invariant:
            tile_linears(self.model, ROW_TILE)
        config = self.model.config
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.eos_token_ids = eos_token_ids(model_path, config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_dtype = cache_dtype(self.device, self.dtype, head_dim, kv_cache_dtype)
        self.cache = PagedKVCache(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                                  head_dim, budget_bytes=kv_cache_bytes, max_model_len=max_model_len, dtype=kv_dtype,
                                  device=self.device)
        self.adapters = AdapterBank(self.model, max_resident_adapters, kv_dtype, batch_invariant=batch_invariant)
        # Prefill chunks ride in decode steps (packed rows) where attention reads ragged sequences in place.
        self.mixed_steps = self.cache.kernel is not None
        host = detect_host()
        log.info("torch engine: %s on %s in %s (dtype %s; CPU %s, %s; %d linear layers prepacked for oneDNN, "
                 "%d norms fused; KV cache in %s)", model_path, self.device, dtype_name(self.dtype), dtype,
                 host.cpu_model, host.isa, packed, fused, dtype_name(kv_dtype))
        ENGINE_INFO.labels("torch").info({"device": self.device.type, "dtype": dtype_name(self.dtype),
                                          "requested_dtype": dtype, "cpu_isa": host.isa,
                                          "kv_cache_dtype": dtype_name(kv_dtype)})

    def execute(self, batch: ScheduledBatch) -> SampledBatch:
        """The step's forward pass, then each sampled row's logits processed (penalties, biases, grammar
        masks) and its next token drawn from its own generator."""
        seqs = batch.sequences
        scored = tuple(i for i, s in enumerate(seqs) if s.is_scoring_prompt)
        logits, full = self.forward_scoring([s.blocks for s in seqs], batch.inputs, [s.computed for s in seqs],
                                            [s.resident for s in seqs], scored, packed=batch.phase == "mixed")
        rows = batch.sampled_rows
        if not rows:
            return SampledBatch([], [], [], full)
        seqs, logits = [seqs[i] for i in rows], logits[rows]
        params = [s.request.sampling for s in seqs]
        changed = apply_logit_changes(logits, params, [(s.request.prompt_token_ids, s.generated) for s in seqs],
                                      self.eos_token_ids)
        masked, refused = mask_to_grammars(changed, [s.matcher for s in seqs], self.grammar_mask_budget_s)
        for row, why in refused.items():
            seqs[row].constraint_failure = why
        tokens = sample(masked, params, [s.generator for s in seqs])
        return SampledBatch(rows, tokens, logprobs_of(logits, tokens, params), full)

    def forward(self, tables: list[list[int]], inputs: list[list[int]], starts: list[int],
                residents: list[Resident | None], *, packed: bool = False) -> torch.Tensor:
        """Sequence i feeds `inputs[i]` at positions starts[i]... into the blocks tables[i], with its own
        adapter. A negative id -k-1 stands for soft-prompt row k of the sequence's prompt-tuning adapter.
        Returns the logits after each sequence's last input (sequences, vocab) in float32.

        Padded: a row per sequence, left-padded to the longest. Packed (`mixed_steps` only): a row per token,
        so a prefill chunk rides in a decode step without padding the decode rows to its length; the
        linear layers see the same (tokens, hidden) either way.
        """
        return self.forward_scoring(tables, inputs, starts, residents, (), packed=packed)[0]

    @torch.inference_mode()
    def forward_scoring(self, tables: list[list[int]], inputs: list[list[int]], starts: list[int],
                        residents: list[Resident | None], full_rows: tuple[int, ...], *, packed: bool = False
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`forward`, plus the logits at every input position (len(inputs[row]), vocab) of each row in
        `full_rows` (prompt logprobs). The LM head runs on the decoder's final hidden states at the positions
        wanted only: every position's logits would take gigabytes, and a packed step's rows are tokens."""
        ids, positions, kv_batch, fed = (self._packed if packed else self._padded)(tables, inputs, starts)
        row_residents, chunks = residents, []
        if packed:  # each row's adapter is its sequence's; the prefill chunks (after the decode rows) run apart
            row_residents = [r for r, tokens in zip(residents, inputs) for _ in tokens]
            chunks = fed[next((i for i, tokens in enumerate(inputs) if len(tokens) > 1), len(inputs)):]
        self.adapters.bind(row_residents, chunks)
        hidden = self.model.base_model(**self._embed(ids, row_residents), position_ids=positions, use_cache=False,
                                       kv_batch=kv_batch).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        if packed:  # the head's LoRA rows: one per sequence
            self.adapters.bind(residents)
        logits = head(hidden[[rows.stop - 1 for rows in fed]][:, None])[:, 0].float()
        full = {}
        for row in full_rows:  # one row at a time, bound to its own adapter (a LoRA may target the head)
            self.adapters.bind([residents[row]])
            full[row] = head(hidden[fed[row]][None])[0].float()
        return logits, full

    def _padded(self, tables: list[list[int]], inputs: list[list[int]], starts: list[int]):
        """(ids, positions, KV batch, each sequence's rows of the flattened hidden states) of the padded
        layout: rows are left-padded, so every row's last token is the last column."""
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
        fed = [slice((row + 1) * width - len(tokens), (row + 1) * width) for row, tokens in enumerate(inputs)]
        return ids, positions, KVBatch.build(self.cache, tables, positions, valid), fed

    def _packed(self, tables: list[list[int]], inputs: list[list[int]], starts: list[int]):
        """The same for the packed layout: one token a row, each sequence's tokens one after another."""
        ids = torch.tensor([token for tokens in inputs for token in tokens], device=self.device)[:, None]
        positions = torch.cat([torch.arange(start, start + len(tokens)) for tokens, start in zip(inputs, starts)])
        positions = positions.to(self.device)[:, None]
        ends = list(itertools.accumulate(map(len, inputs)))
        fed = [slice(end - len(tokens), end) for tokens, end in zip(inputs, ends)]
        return ids, positions, KVBatch.packed(self.cache, tables, positions, list(map(len, inputs))), fed

    def _embed(self, ids: torch.Tensor, residents: list[Resident | None]) -> dict[str, torch.Tensor]:
        """Token ids, or input embeddings when some row carries soft-prompt positions."""
        soft = ids < 0
        if not soft.any():
            return {"input_ids": ids}
        embeds = self.model.get_input_embeddings()(ids.clamp(min=0))
        for row in soft.any(dim=1).nonzero().flatten().tolist():  # packed rows are tokens: visit only these
            resident = residents[row]
            soft_prompt = self.adapters.soft_prompt(resident) if resident is not None else None
            if soft_prompt is not None:
                embeds[row, soft[row]] = soft_prompt[-1 - ids[row, soft[row]]]
        return {"inputs_embeds": embeds}
