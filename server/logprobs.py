"""Engine logprobs (token ids) in OpenAI's two shapes: chat's list of entries, completions' parallel lists."""

from transformers import PreTrainedTokenizerBase

from server.engine.base import TokenLogprob
from server.web.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


class LogprobFormatter:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        """The token as text; a token holding part of a UTF-8 character decodes to U+FFFD, as in vLLM."""
        return self._tokenizer.decode([token_id])

    def _entry(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def chat(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(**self._entry(e.token_id, e.logprob).model_dump(),
                             top_logprobs=[self._entry(i, lp) for i, lp in e.top])
            for e in entries])

    def completion(self, entries: list[TokenLogprob], text_offset: int = 0) -> CompletionLogprobs:
        """`text_offset`: where the first token's text starts in the choice's text (a stream's later chunks)."""
        tokens = [self.text(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        tops: list[dict[str, float] | None] = []
        for e in entries:
            top: dict[str, float] = {}
            for i, lp in e.top:  # likeliest first; alternatives that decode alike keep the likelier (keyed by text)
                top.setdefault(self.text(i), lp)
            tops.append(top if e.logprob is not None else None)  # a prompt's first token has none
        return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries], top_logprobs=tops,
                                  text_offset=offsets)
