"""Turns the sampled tokens of a step into what each request receives: text detokenized incrementally,
stop conditions (end tokens, stop strings, grammars, length), logprobs and prompt logprobs."""

import logging

import torch

from server.engine.base import ConstraintFailed, GenerationOutput, TokenLogprob
from server.engine.torch.sampler import prompt_logprobs_of
from server.engine.torch.sequence import SampledBatch, ScheduledBatch, Sequence

log = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, eos_token_ids: set[int], max_model_len: int):
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len

    def process(self, batch: ScheduledBatch, sampled: SampledBatch) -> list[GenerationOutput]:
        """One output per sampled row, in order."""
        return [self._output(batch.sequences[row], token, logprob)
                for row, token, logprob in zip(sampled.rows, sampled.tokens, sampled.logprobs)]

    def _output(self, seq: Sequence, token: int | None, logprob: TokenLogprob | None) -> GenerationOutput:
        """The row's output for this step (with its prompt logprobs at the end of a prefill that asked)."""
        if token is None:
            if seq.constraint_failure is not None:  # the client's constraint, not the model: a 400
                refusal = ConstraintFailed(seq.request.constraint_param, seq.constraint_failure)
                return seq.failure(str(refusal), refusal)
            return seq.failure("generation failed: the model produced non-finite logits for this request")
        sampling, prompt = seq.request.sampling, seq.request.prompt_token_ids
        try:  # everything here is this row's own: a failure fails it, not the batch
            prompt_logprobs = None
            if seq.prompt_logits:  # logits at every input position of its prefill, chunk by chunk
                prompt_logprobs = prompt_logprobs_of(torch.cat(seq.prompt_logits), prompt, sampling.prompt_logprobs)
                seq.prompt_logits = []
            if sampling.max_tokens == 0:  # scoring only: the prompt's logprobs, no token
                return GenerationOutput("", [], len(prompt), 0, "length", prompt_logprobs=prompt_logprobs,
                                        queue_time=seq.first_scheduled - seq.request.arrival_time)
            out = self._next_output(seq, token)
            out.logprobs = [logprob] if logprob is not None else None
            out.prompt_logprobs = prompt_logprobs
            return out
        except Exception as exc:  # detokenizing or stop strings: this row fails, not the batch
            log.exception("output processing failed for one sequence")
            return seq.failure(f"generation failed: {exc}")

    def _next_output(self, seq: Sequence, token: int) -> GenerationOutput:
        seq.generated.append(token)
        sampling = seq.request.sampling
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise ValueError(f"token {token} breaks the output's grammar")
        if ((token in self.eos_token_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids
                or (seq.matcher is not None and seq.matcher.is_terminated())):
            text, reason = seq.text.flush(), "stop"
        else:
            text, stopped = seq.text.add(token)
            reason = "stop" if stopped else None
            if reason is None and (len(seq.generated) >= sampling.max_tokens
                                   or seq.length >= self.max_model_len):
                text, reason = text + seq.text.flush(), "length"
        queue_time = seq.first_scheduled - seq.request.arrival_time if len(seq.generated) == 1 else None
        return GenerationOutput(text, [token], len(seq.request.prompt_token_ids), len(seq.generated), reason,
                                queue_time=queue_time)
