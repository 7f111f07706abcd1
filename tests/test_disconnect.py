"""A client that hangs up mid-stream frees its sequence in the engine."""

import time

from conftest import MODEL, ask, scrape

LABEL = (("model", MODEL),)


def test_disconnect_mid_stream_aborts_generation(http):
    aborted = ("swapyard_requests_total", (("finish_reason", "abort"), ("model", MODEL)))
    before = scrape(http)
    body = {"model": MODEL, "messages": ask("Write a very long story about a dragon."), "temperature": 0,
            "max_tokens": 800, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    # Closing the response closed the connection; the engine must drop the sequence well before 800 tokens.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = scrape(http)
        if after.get(aborted, 0) > before.get(aborted, 0) and after[("swapyard_requests_running", LABEL)] == 0:
            break
        time.sleep(0.2)
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    tokens = ("swapyard_generation_tokens_total", LABEL)  # absent before where no test generated with the base yet
    generated = after[tokens] - before.get(tokens, 0)
    assert generated < 400
