"""A bounded load test on loopback: 200 concurrent streaming requests spread over 8 adapters (two of
each kind). No request fails, and every stream carries its own adapter's signature:
the greedy text that adapter gives when asked alone, so a response routed to, or mixed with, another
adapter's rows would show."""

import asyncio
import json

import httpx

from adapter_factory import make_adapter
from conftest import MODEL_PATH, ask, running_server

NUM_REQUESTS, MAX_TOKENS = 200, 24
QUESTION = ask("Write a short poem about the sea.")
# Two random adapters of each kind whose greedy answers to QUESTION all differ (and are not empty).
SEEDS = {"lora": (3, 4), "prefix": (3, 4), "prompt": (3, 5), "bottleneck": (3, 4)}


async def _stream(client: httpx.AsyncClient, model: str) -> str:
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True}
    parts = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                parts.append(event["choices"][0]["delta"].get("content", ""))
    return "".join(parts)


async def _load(base_url: str, models: list[str]) -> list[str]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        return await asyncio.gather(*(_stream(client, models[i % len(models)]) for i in range(NUM_REQUESTS)))


def test_200_concurrent_streams_over_8_adapters(tmp_path, adapter_root):
    adapters = {f"load-{kind}-{seed}": make_adapter(kind, MODEL_PATH, adapter_root / f"load-{kind}-{seed}", seed=seed)
                for kind, seeds in SEEDS.items() for seed in seeds}
    with running_server(max_resident_adapters=len(adapters), data_dir=tmp_path / "data",
                        adapter_roots=[adapter_root]) as url:
        for name, folder in adapters.items():
            response = httpx.post(f"{url}/v1/adapters", json={"name": name, "path": str(folder)})
            assert response.status_code == 201, response.text
        models = list(adapters)
        signatures = {model: asyncio.run(_load_one(url, model)) for model in models}
        assert len(set(signatures.values())) == len(models), signatures  # every adapter is told apart by its answer

        texts = asyncio.run(_load(url, models))
        assert len(texts) == NUM_REQUESTS
        for i, text in enumerate(texts):
            assert text == signatures[models[i % len(models)]], f"request {i} for {models[i % len(models)]}"
        assert httpx.get(f"{url}/health").status_code == 200


async def _load_one(base_url: str, model: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        return await _stream(client, model)
