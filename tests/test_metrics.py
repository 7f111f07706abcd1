"""Per-model Prometheus metrics move with each request."""

from conftest import MODEL, ask, scrape

LABEL = (("model", MODEL),)


def test_metrics_move_after_a_request(oai, http):
    before = scrape(http)
    reply = oai.chat.completions.create(model=MODEL, messages=ask("Say hi."), temperature=0, max_tokens=5)
    after = scrape(http)

    def moved(name, labels=LABEL):
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("swapyard_generation_tokens_total") == reply.usage.completion_tokens
    assert moved("swapyard_prompt_tokens_total") == reply.usage.prompt_tokens
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"swapyard_{histogram}_seconds_count") == 1
    assert moved("swapyard_inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
    finish = (("finish_reason", reply.choices[0].finish_reason), ("model", MODEL))
    assert moved("swapyard_requests_total", finish) == 1
    assert after[("swapyard_requests_running", LABEL)] == 0
    assert after[("swapyard_requests_waiting", LABEL)] == 0
