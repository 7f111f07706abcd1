"""Request limits: past --max-num-seqs + --max-queued-requests in flight a request gets 429 with
Retry-After at once (admitted ones still finish); prompt and max_tokens caps answer 400 naming the
field; CORS is off unless origins are configured."""

import asyncio

import httpx
import pytest

from conftest import MODEL, ask, running_server


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    with running_server(max_num_seqs=2, max_queued_requests=1, max_prompt_tokens=64, max_tokens_limit=40,
                        cors_origins=["https://app.example"], data_dir=tmp) as url:
        yield url


async def _burst(url: str, n: int) -> list[httpx.Response]:
    body = {"model": MODEL, "messages": ask("Count to twenty."), "max_tokens": 32, "temperature": 0,
            "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))


def test_over_capacity_is_429_with_retry_after(limited):
    responses = asyncio.run(_burst(limited, 8))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) == {200, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "over_capacity"
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in responses if r.status_code == 200)
    assert httpx.get(f"{limited}/metrics").text.count('swapyard_requests_rejected_total{reason="over_capacity"}')
    assert asyncio.run(_burst(limited, 1))[0].status_code == 200  # capacity is back once they finished


def test_prompt_and_max_tokens_caps(limited):
    long = httpx.post(f"{limited}/v1/chat/completions", json={"model": MODEL, "messages": ask("word " * 100)})
    assert long.status_code == 400 and long.json()["error"]["param"] == "messages"
    over = httpx.post(f"{limited}/v1/chat/completions", json={"model": MODEL, "messages": ask("Hi"),
                                                              "max_tokens": 41})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    capped = httpx.post(f"{limited}/v1/chat/completions", timeout=120,
                        json={"model": MODEL, "messages": ask("Hi"), "ignore_eos": True, "temperature": 0})
    assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] == 40  # the cap is the default


def _preflight(url: str) -> httpx.Response:
    return httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})


def test_cors_only_for_configured_origins(limited, base_url):
    assert _preflight(limited).headers.get("access-control-allow-origin") == "https://app.example"
    assert "access-control-allow-origin" not in _preflight(base_url).headers  # the default server: off


def test_oversized_json_body_is_413(base_url):
    big = {"model": MODEL, "messages": ask("x" * (9 * 2**20))}  # over the default 8 MB
    assert httpx.post(f"{base_url}/v1/chat/completions", json=big, timeout=60).status_code == 413

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 2**20
        yield b'"}]}'
    chunked = httpx.post(f"{base_url}/v1/chat/completions", content=chunks(),
                         headers={"content-type": "application/json"}, timeout=60)
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]["message"]


def test_health_answers_while_a_huge_message_is_tokenized(base_url):
    """Templating and tokenizing 7 MB of text takes seconds; it runs off the event loop, so probes
    (and every other client) are answered meanwhile."""

    async def probe_while_tokenizing() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            big = asyncio.create_task(client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": ask("hello world, this is a test. " * 250_000)}))
            slowest = 0.0
            while not big.done():
                start = asyncio.get_running_loop().time()
                assert (await client.get("/health")).status_code == 200
                slowest = max(slowest, asyncio.get_running_loop().time() - start)
                await asyncio.sleep(0.05)
            return await big, slowest

    response, slowest = asyncio.run(probe_while_tokenizing())
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert slowest < 1.0  # it waited ~4 s on this machine when tokenizing ran on the event loop
