"""Structured outputs: a request's constraint compiled to an xgrammar grammar (the library vLLM and SGLang
use), so the engine loop only masks each constrained row's logits.

Compiling in the router refuses a bad schema or regex with a 400 before anything reaches an engine. It is
bounded work: a schema over the structural limits is refused before compiling, the compile itself runs in a
worker process within --max-grammar-compile-s (server/grammar_workers.py), and a constraint no output can
match is refused too. Compiled grammars are cached per tenant, so no tenant learns from a compile's speed what
another one sent. JSON is generated compact (no free whitespace): a small model otherwise can emit spaces
until max_tokens.
"""

import asyncio
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import xgrammar as xgr
from cachetools import LRUCache
from transformers import PreTrainedTokenizerBase

from server.engine.base import GenerationRequest, OutputConstraint
from server.grammar_workers import CompileTimeout, GrammarWorkers
from server.web.protocol import MAX_SPEC_CHARS

log = logging.getLogger(__name__)

# A JSON schema's size, bounded before compiling (xgrammar's compile time grows steeply with each: a
# 1000-level array or 3,400 optional properties compiled for minutes). OpenAI allows 10 levels of nesting, 5000
# properties and 1000 enum values; the nesting here counts every JSON level of the schema document (an object
# schema's property is two levels down: `properties`, then the property's schema).
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_PROPERTIES = 1000
MAX_SCHEMA_ALTERNATIVES = 1000  # enum values, and anyOf / oneOf / allOf branches
CACHE_BYTES = 256 << 20


def check_schema_size(spec: str) -> None:
    """Raise ValueError when a JSON schema is nested deeper or holds more than the limits above."""
    try:
        schema = json.loads(spec)
    except RecursionError:
        raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError:
        return  # not JSON: the compile says so
    stack, properties, alternatives = [(schema, 1)], 0, 0
    while stack:  # iterative: a deep schema must not exhaust Python's stack
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict):
                properties += len(node["properties"])
            alternatives += sum(len(node[key]) for key in ("enum", "anyOf", "oneOf", "allOf")
                                if isinstance(node.get(key), list))
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    if properties > MAX_SCHEMA_PROPERTIES:
        raise ValueError(f"the schema has {properties} properties; at most {MAX_SCHEMA_PROPERTIES} are accepted")
    if alternatives > MAX_SCHEMA_ALTERNATIVES:
        raise ValueError(f"the schema has {alternatives} enum values and anyOf/oneOf/allOf branches; at most "
                         f"{MAX_SCHEMA_ALTERNATIVES} are accepted")


class GrammarCompiler:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: set[int], *,
                 workers: int, budget_s: float):
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                        stop_token_ids=sorted(stop_token_ids))
        self._workers = GrammarWorkers(self._info.serialize_json(), workers)
        self.budget_s = budget_s
        # (tenant, kind, spec digest) -> compiled grammar, least recently used out first, bounded in bytes
        self._cache: LRUCache = LRUCache(CACHE_BYTES, getsizeof=lambda grammar: grammar.memory_size_bytes)
        # Reading a compiled grammar back takes milliseconds to tens of them: neither on the event loop nor
        # on its executor, which every request shares.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="swapyard-grammar-load")

    async def compile(self, constraint: OutputConstraint, tenant: str = "") -> xgr.CompiledGrammar:
        """Raises ValueError naming what is wrong with the spec, WorkersBusy when no worker was free within the
        budget. Every constraint comes here (a request's own, or a tool call's schema), so this is where its
        size is bounded."""
        if len(constraint.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"the {constraint.kind} is longer than {MAX_SPEC_CHARS} characters")
        if constraint.kind == "json":
            check_schema_size(constraint.spec)
        key = (tenant, constraint.kind, hashlib.sha256(constraint.spec.encode()).digest())
        if (grammar := self._cache.get(key)) is not None:
            return grammar
        try:
            compiled = await self._workers.compile(constraint.kind, constraint.spec, self.budget_s)
        except CompileTimeout:
            raise ValueError(f"the {constraint.kind} did not compile within this server's limit of "
                             f"{self.budget_s:g} s (--max-grammar-compile-s); simplify it") from None
        grammar = await asyncio.get_running_loop().run_in_executor(self._thread, self._load, compiled, constraint.kind)
        if grammar.memory_size_bytes <= CACHE_BYTES:
            self._cache[key] = grammar
        return grammar

    def _load(self, compiled: str, kind: str) -> xgr.CompiledGrammar:
        grammar = xgr.CompiledGrammar.deserialize_json(compiled, self._info)
        bitmask = xgr.allocate_token_bitmask(1, self._info.vocab_size)
        xgr.GrammarMatcher(grammar).fill_next_token_bitmask(bitmask, 0)
        if not bitmask.any():  # not even the end: generation would have nothing to sample
            raise ValueError(f"no output can match the {kind}")
        return grammar

    def close(self) -> None:
        self._workers.close()
        self._thread.shutdown(wait=False)


def new_matcher(request: GenerationRequest) -> xgr.GrammarMatcher | None:
    """The per-sequence state of its grammar (None: unconstrained)."""
    return xgr.GrammarMatcher(request.grammar) if request.grammar is not None else None


def mask_to_grammars(logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None],
                     budget_s: float) -> tuple[torch.Tensor, dict[int, str]]:
    """Each constrained row's logits with every token its grammar forbids next at -inf (a copy; untouched
    when no row is constrained), and the rows that failed, with why: a grammar that raised, whose mask took
    over `budget_s` of the engine thread's CPU time (an ambiguous grammar's grows with every token), or that
    leaves no token to choose (none allowed, or only ones that min_tokens or logit_bias rule out). A failed
    row fails alone; the budget bounds what one row can cost the others' step."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits, {}
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    masked, failed = logits.clone(), {}
    for i in rows:
        start = time.thread_time()  # CPU time: a preempted thread's wait is not the grammar's cost
        try:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        except Exception:
            log.exception("a grammar failed for one row")
            failed[i] = "the constraint could not be evaluated"
            continue
        if (took := time.thread_time() - start) > budget_s:
            failed[i] = (f"the constraint took {took * 1000:.0f} ms to evaluate for one token, over this server's "
                         f"limit of {budget_s * 1000:.0f} ms (--max-grammar-mask-ms); simplify it")
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), indices=rows)
    for i, dead in zip(rows, (masked[rows] == -torch.inf).all(-1).tolist()):
        if dead and i not in failed:
            failed[i] = "no output can match the constraint here: it allows no token that can be chosen"
    masked[list(failed)] = torch.nan
    return masked, failed
