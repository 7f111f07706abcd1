"""Continuous batching: concurrent requests share engine steps and get the answers they get alone."""

import asyncio

import httpx

from conftest import MODEL, ask, scrape

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello.",
             "What is the largest ocean?", "Name a fruit.", "What colour is the sky?", "Count to five."]


def _body(question: str, stream: bool) -> dict:
    return {"model": MODEL, "messages": ask(question), "temperature": 0, "max_tokens": 24, "stream": stream}


async def _stream_text(client: httpx.AsyncClient, question: str) -> str:
    import json

    parts = []
    async with client.stream("POST", "/v1/chat/completions", json=_body(question, True)) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                parts.append(chunk["choices"][0]["delta"].get("content", "") if chunk["choices"] else "")
    return "".join(parts)


async def _concurrently(base_url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        return await asyncio.gather(*(_stream_text(client, q) for q in QUESTIONS))


def _decode_steps(http) -> tuple[float, float]:
    """(all decode steps, decode steps that ran a single sequence)."""
    metrics = scrape(http)
    total = metrics[("swapyard_engine_batch_size_count", (("phase", "decode"),))]
    single = metrics[("swapyard_engine_batch_size_bucket", (("le", "1.0"), ("phase", "decode")))]
    return total, single


def test_concurrent_requests_share_steps_and_match_solo_answers(http, base_url):
    alone = [http.post("/v1/chat/completions", json=_body(q, False)).json()["choices"][0]["message"]["content"]
             for q in QUESTIONS]
    total_before, single_before = _decode_steps(http)
    together = asyncio.run(_concurrently(base_url))
    total_after, single_after = _decode_steps(http)
    # Some decode step ran more than one sequence.
    assert total_after - total_before > single_after - single_before
    assert together == alone
