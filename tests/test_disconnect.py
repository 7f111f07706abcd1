"""A client that hangs up mid-stream frees its sequence in the engine."""

import time

import httpx
import pytest

from conftest import MODEL, ask, scrape

LABEL = (("model", MODEL), ("version", ""))  # the base model: no adapter version
ABORTED = ("swapyard_requests_total", (("finish_reason", "abort"), ("model", MODEL), ("version", "")))


def _tokens_until_aborted(http, before: dict) -> float:
    """Waits until the one request begun after `before` (a scrape) was aborted and nothing runs; returns the
    tokens it generated meanwhile."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = scrape(http)
        if after.get(ABORTED, 0) > before.get(ABORTED, 0) and after[("swapyard_requests_running", LABEL)] == 0:
            break
        time.sleep(0.2)
    assert after.get(ABORTED, 0) == before.get(ABORTED, 0) + 1
    tokens = ("swapyard_generation_tokens_total", LABEL)  # absent before where no test generated with the base yet
    return after.get(tokens, 0) - before.get(tokens, 0)


def test_disconnect_mid_stream_aborts_generation(http):
    before = scrape(http)
    body = {"model": MODEL, "messages": ask("Write a very long story about a dragon."), "temperature": 0,
            "max_tokens": 800, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    # Closing the response closed the connection; the engine must drop the sequence well before 800 tokens.
    assert _tokens_until_aborted(http, before) < 400


def test_a_client_gone_before_its_answer_aborts_generation(http):
    """Not streamed: the client gives up (a timeout) before the answer is ready; the engine drops the request
    instead of generating for nobody."""
    before = scrape(http)
    body = {"model": MODEL, "messages": ask("Write a very long story about a dragon."), "temperature": 0,
            "max_tokens": 800, "min_tokens": 800}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{http.base_url}/v1/chat/completions", json=body, timeout=2)
    assert _tokens_until_aborted(http, before) < 400
