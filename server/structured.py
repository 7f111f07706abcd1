"""Structured outputs: a request's constraint compiled to an xgrammar grammar (the library vLLM and SGLang
use), in a worker thread and cached by spec, so the engine loop only masks each constrained row's logits.

Compiling in the router refuses a bad schema or regex with a 400 before anything reaches an engine.
JSON is generated compact (no free whitespace): a small model otherwise can emit spaces until max_tokens.
"""

import asyncio
import json
import logging
import re

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from server.engine.base import GenerationRequest, OutputConstraint
from server.web.protocol import MAX_SPEC_CHARS


log = logging.getLogger(__name__)

ANY_OBJECT = '{"type": "object"}'
# xgrammar's messages start with a timestamp and its C++ source location: not the client's business.
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


class GrammarCompiler:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: set[int]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        # xgrammar caches compiled grammars by their source (schema text, regex, ...), bounded in bytes.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True, cache_limit_bytes=256 << 20)

    async def compile(self, constraint: OutputConstraint) -> xgr.CompiledGrammar:
        """Raises ValueError naming what is wrong with the spec. Every constraint comes here (a request's
        own, or a tool call's schema), so this is where its size is bounded."""
        if len(constraint.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"the {constraint.kind} is longer than {MAX_SPEC_CHARS} characters")
        return await asyncio.to_thread(self._compile, constraint)

    def _compile(self, c: OutputConstraint) -> xgr.CompiledGrammar:
        try:
            if c.kind == "json":
                return self._compiler.compile_json_schema(c.spec, any_whitespace=False)
            if c.kind == "json_object":  # an object, as OpenAI means it (xgrammar's builtin takes any value)
                return self._compiler.compile_json_schema(ANY_OBJECT, any_whitespace=False)
            if c.kind == "regex":
                return self._compiler.compile_regex(c.spec)
            if c.kind == "choice":
                return self._compiler.compile_regex("|".join(re.escape(choice) for choice in json.loads(c.spec)))
            return self._compiler.compile_grammar(c.spec)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad input as these
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(_SOURCE_PREFIX.sub("", first_line)[:300]) from exc


def new_matcher(request: GenerationRequest) -> xgr.GrammarMatcher | None:
    """The per-sequence state of its grammar (None: unconstrained)."""
    return xgr.GrammarMatcher(request.grammar) if request.grammar is not None else None


def mask_to_grammars(logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]) -> torch.Tensor:
    """Each constrained row's logits with every token its grammar forbids next at -inf (a copy; untouched
    when no row is constrained). A row whose grammar fails gets NaN logits, so it fails alone."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    masked, failed = logits.clone(), []
    for i in rows:
        try:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        except Exception:
            log.exception("a grammar failed for one row")
            failed.append(i)
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), indices=rows)
    masked[failed] = torch.nan
    return masked
