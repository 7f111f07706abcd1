"""Stop strings are matched incrementally (Knuth-Morris-Pratt): the text a client receives is exactly the
text up to the earliest-ending stop string, however the stops overlap themselves or each other."""

from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.torch.detokenizer import StopMatcher

_ALPHABET = st.text(alphabet="ab", min_size=1, max_size=12)  # two letters: many self-overlapping stops


def _first_end(text: str, stops: list[str]) -> int | None:
    """Reference: the smallest index at which some stop string has just been completed."""
    ends = [i for i in range(1, len(text) + 1) if any(text[:i].endswith(s) for s in stops)]
    return ends[0] if ends else None


@settings(max_examples=300, derandomize=True, deadline=None)
@given(text=st.text(alphabet="ab", max_size=60), stops=st.lists(_ALPHABET, min_size=1, max_size=4))
def test_matchers_find_the_earliest_end_and_hold_back_what_may_still_match(text, stops):
    matchers = [StopMatcher(s) for s in stops]
    for i, char in enumerate(text, 1):
        completed = [m.feed(char) for m in matchers]
        if any(completed):
            assert _first_end(text, stops) == i
            return
        # What a matcher holds back is the longest text suffix that starts one of its stop strings.
        for matcher in matchers:
            expected = max((k for k in range(len(matcher.stop)) if text[:i].endswith(matcher.stop[:k])), default=0)
            assert matcher.num_matched == expected
    assert _first_end(text, stops) is None
