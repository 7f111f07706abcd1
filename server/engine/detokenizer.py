"""Incremental detokenization with stop strings held back until they can no longer match."""

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self.text = ""
        self._sent = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text safe to send now, whether a stop string ended the text)."""
        piece = self._stream.step(self._tokenizer, token_id)
        if piece:
            self.text += piece
        search_from = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._pending_stop_prefix()), False

    def flush(self) -> str:
        """Whatever was held back, once the sequence ends for another reason."""
        return self._take(len(self.text))

    def _pending_stop_prefix(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        return max((k for s in self._stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        delta, self._sent = self.text[self._sent : end], end
        return delta
