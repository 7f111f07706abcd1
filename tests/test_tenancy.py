"""Tenants apart (issue 36): a quiet tenant's time to first token stays near its alone latency beside another
tenant's flood and beside its 4,000-token prompts; the noisy tenant's 429s name its own limit (requests in
flight, tokens per minute, its share of a full server), never another's; usage metrics per tenant name."""

import asyncio
import contextlib
import itertools
import json
import math
import time

import httpx
import pytest

from conftest import MODEL, ask, running_server, scrape
from server.tenancy import PolicyFile, Tenants

KEYS = {"quiet": "sk-quiet-1111", "noisy": "sk-noisy-2222", "metered": "sk-metered-3333", "ops": "sk-ops-4444"}
POLICY = """
[tenants.noisy]
max_in_flight = 12
priority = "low"

[tenants.metered]
tokens_per_minute = 100
"""
LONG = " ".join(f"Clause {i}: the tenant shall keep ledger {i} in room {i % 9}." for i in range(205))  # ~3,900 tokens


@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenancy")
    (tmp / "keys.txt").write_text("".join(f"{'admin' if name == 'ops' else 'inference'}:{key} {name}\n"
                                          for name, key in KEYS.items()))
    (tmp / "policy.toml").write_text(POLICY)
    with running_server(api_keys_file=tmp / "keys.txt", tenant_policy_file=tmp / "policy.toml", max_model_len=4096,
                        max_num_seqs=8, data_dir=tmp / "data") as url:
        yield url


def _bearer(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def _ttft(client: httpx.AsyncClient) -> float:
    start = time.perf_counter()
    body = {"model": MODEL, "messages": ask("Name three colours."), "max_tokens": 8, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=_bearer("quiet")) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return time.perf_counter() - start
    raise AssertionError("no token")


async def _quiet_ttft(url: str, samples: int = 10) -> tuple[float, float]:
    """The quiet tenant's TTFT p50 and p95 over `samples` chats one after another (of 10, the slowest)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        times = sorted([await _ttft(client) for _ in range(samples)])
    return times[samples // 2], times[math.ceil(0.95 * samples) - 1]  # nearest rank


async def _beside(url: str, body: dict, width: int) -> tuple[tuple[float, float], list[httpx.Response]]:
    """The quiet tenant's TTFT p50 and p95 while the noisy tenant keeps `width` requests of `body` in flight; the
    noisy tenant's refusals."""
    refused: list[httpx.Response] = []

    async def lane(client: httpx.AsyncClient) -> None:
        for _ in itertools.count():
            response = await client.post("/v1/chat/completions", json=body, headers=_bearer("noisy"))
            if response.status_code != 200:
                refused.append(response)
                await asyncio.sleep(float(response.headers["retry-after"]))  # as the OpenAI SDKs wait

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=width)) as client:
        lanes = [asyncio.create_task(lane(client)) for _ in range(width)]
        await asyncio.sleep(1.5)  # the noise is under way
        try:
            return await _quiet_ttft(url), refused
        finally:
            for task in lanes:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*lanes)
            await asyncio.sleep(1.0)  # the aborted requests leave the engine


def test_a_quiet_tenant_keeps_its_first_token_time_beside_a_flood_and_long_prompts(tenants_server):
    asyncio.run(_quiet_ttft(tenants_server, 3))  # warm
    _, alone = asyncio.run(_quiet_ttft(tenants_server))  # p95
    flood = {"model": MODEL, "messages": ask("Tell me a story."), "max_tokens": 48, "ignore_eos": True}
    # 12 of the noisy tenant's requests in flight: 8 of them would hold every slot (max_num_seqs 8), but the
    # quiet tenant's request takes one at once.
    (_, beside_flood), refused = asyncio.run(_beside(tenants_server, flood, width=16))
    long = {"model": MODEL, "messages": ask(f"{LONG} Summarize."), "max_tokens": 4}
    (long_p50, long_p95), _ = asyncio.run(_beside(tenants_server, long, width=4))
    # Before fair queuing a first-come queue made these 16x (flood) and 100x (long prompts: seconds).
    assert beside_flood <= 1.5 * alone + 0.1, (alone, beside_flood)
    # Beside long prompts a request waits for the step in progress: while tenants share the engine it feeds at
    # most 64 tokens, which on a 2-core CPU takes up to 0.3 s (the test's client shares the server's process).
    assert long_p50 <= 1.5 * alone + 0.15 and long_p95 <= 1.5 * alone + 0.45, (alone, long_p50, long_p95)
    assert refused and {r.status_code for r in refused} == {429}
    error = refused[0].json()["error"]
    assert error["code"] == "tenant_in_flight_limit" and "tenant `noisy`" in error["message"] \
        and "max_in_flight 12" in error["message"] and refused[0].headers["retry-after"] == "1"


def test_a_tenant_over_its_tokens_per_minute_waits_and_the_others_do_not(tenants_server):
    body = {"model": MODEL, "messages": ask("Hi"), "max_tokens": 8}
    statuses = []
    for _ in range(8):
        response = httpx.post(f"{tenants_server}/v1/chat/completions", json=body, headers=_bearer("metered"),
                              timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    error = response.json()["error"]
    assert error["code"] == "tenant_token_limit" and "tenant `metered` used its 100 tokens per minute" in \
        error["message"] and 1 <= int(response.headers["retry-after"]) <= 60
    assert httpx.post(f"{tenants_server}/v1/chat/completions", json=body, headers=_bearer("quiet"),
                      timeout=60).status_code == 200


def test_usage_metrics_are_labelled_by_tenant_name(tenants_server):
    httpx.post(f"{tenants_server}/v1/chat/completions", json={"model": MODEL, "messages": ask("Hi"), "max_tokens": 2},
               headers=_bearer("quiet"), timeout=60).raise_for_status()
    with httpx.Client(base_url=tenants_server, headers=_bearer("ops")) as client:
        text = client.get("/metrics").text
        samples = scrape(client)
    assert samples[("swapyard_tenant_tokens_total", (("kind", "prompt"), ("tenant", "quiet")))] > 0
    assert samples[("swapyard_tenant_tokens_total", (("kind", "generated"), ("tenant", "quiet")))] > 0
    assert not any(key in text for key in KEYS.values())


def test_policy_files_are_checked_at_start(tmp_path):
    policy = tmp_path / "policy.toml"
    for text, complaint in (("[tenants.acme]\npriority = 'high'\n", r"no API key belongs to tenant\(s\) acme"),
                            ("[default]\npriority = 'urgent'\n", "priority"),
                            ("[default]\nmax_in_flight = true\n", "max_in_flight"),
                            ("[default]\nmax_in_flight = 0\n", "max_in_flight"),
                            ("[default]\nburst = 3\n", "burst"),
                            ("[default\n", "policy.toml")):
        policy.write_text(text)
        with pytest.raises(SystemExit, match=complaint):
            PolicyFile.load(policy, known={"quiet"})
    policy.write_text("[tenants.quiet]\npriority = 'high'\n")
    assert PolicyFile.load(policy, known={"quiet"}).of("quiet").weight == 4.0


def test_a_full_server_refuses_the_tenant_over_its_share_not_the_one_under_it():
    tenants = Tenants(PolicyFile(), pool=4)
    for _ in range(4):
        assert tenants.refusal("a") is None
        tenants.enter("a")
    assert tenants.refusal("b") is None  # the pool is full, but only with a's requests
    tenants.enter("b")
    refused = tenants.refusal("a")
    assert refused.status_code == 429 and refused.body.error.code == "over_capacity"
    assert "tenant `a` holds 4 of them, its share while 2 tenant(s) send" in refused.body.error.message
    for name in "cde":  # newcomers below their shares, until twice the pool is in flight
        assert tenants.refusal(name) is None
        tenants.enter(name)
    refused = tenants.refusal("f")
    assert refused.body.error.code == "over_capacity" and "twice its limit of 4" in refused.body.error.message
    for name in "abcde":
        tenants.leave(name)
    assert tenants.in_flight == {"a": 3}
