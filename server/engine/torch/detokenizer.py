"""Incremental detokenization with stop strings held back until they can no longer match.

Stop strings are matched with Knuth-Morris-Pratt, one automaton per string fed each new character:
the check costs time linear in the text generated, whatever the stop strings look like (a search of
the whole held-back tail per token was quadratic and ran on the engine thread, stalling every request).
"""

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class StopMatcher:
    def __init__(self, stop: str):
        self.stop = stop
        # fallback[k]: length of the longest proper prefix of stop[:k + 1] that is also its suffix.
        self._fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fallback[i] = k
        self.num_matched = 0  # the longest prefix of the stop string that the text ends with

    def feed(self, char: str) -> bool:
        """Advance by one character of text; True when the stop string has just been completed."""
        k = self.num_matched
        while k and self.stop[k] != char:
            k = self._fallback[k - 1]
        if self.stop[k] == char:
            k += 1
        self.num_matched = k
        return k == len(self.stop)


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stops = [StopMatcher(s) for s in stop]
        self.text = ""
        self._sent = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text safe to send now, whether a stop string ended the text)."""
        piece = self._stream.step(self._tokenizer, token_id) or ""
        start = len(self.text)
        self.text += piece
        for offset, char in enumerate(piece):
            for matcher in self._stops:
                if matcher.feed(char):
                    self.text = self.text[: start + offset + 1 - len(matcher.stop)]
                    return self._take(len(self.text)), True
        held_back = max((m.num_matched for m in self._stops), default=0)
        return self._take(len(self.text) - held_back), False

    def flush(self) -> str:
        """Whatever was held back, once the sequence ends for another reason."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        delta, self._sent = self.text[self._sent : end], end
        return delta
