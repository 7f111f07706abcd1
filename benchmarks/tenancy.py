"""A quiet tenant beside a noisy one: the quiet tenant's time to first token (p50, p95) alone, then beside
each kind of noise from the other tenant's key, on one server in one run.

    .venv/bin/python benchmarks/tenancy.py [--samples 20] [-- --dtype float32]

Two API keys, two tenants (`quiet`, `noisy`); the noisy one has --noisy-max-in-flight in a policy file. The
quiet tenant sends a greedy 16-token chat, one at a time. The noise, each in its own phase, from clients
that give up after --patience-s (as an attacker's would):
- grammars: schemas that each take xgrammar seconds to compile (distinct, so no cache helps), 24 at a time;
- flood: as many short chats as --max-num-seqs, kept in flight (those over the noisy key's limit get 429s,
  and wait as its Retry-After says, as the OpenAI SDKs do: a client spinning on 429s is for a gateway's
  rate limit);
- long prompts: 4 chats of about 4,000 tokens, kept in flight.
Target (issue 36): TTFT p95 within 1.5x of alone beside each.

Then the cost of --batch-invariant: base-model tokens/s of --cost-streams greedy streams on a bf16 server
without it and with it, one after the other (--skip-cost leaves it out).
"""

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve_throughput import percentile, run_clients, start_server

from server.host import detect_host

QUIET = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "max_tokens": 16,
         "stream": True}
LONG_TEXT = " ".join(f"Clause {i}: the tenant shall keep ledger {i} in room {i % 9}." for i in range(205))
KEYS = {"quiet": "sk-bench-quiet", "noisy": "sk-bench-noisy"}


def heavy_schema(i: int) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"k{i}_{j}": {"type": "integer"} for j in range(900)}}}},
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def flood_body(_: int) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64}


def long_body(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{i}. {LONG_TEXT} Summarize."}], "max_tokens": 16}


async def ttft(client: httpx.AsyncClient, model: str) -> float:
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json={"model": model, **QUIET}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the quiet tenant's request failed: {event['error']}")
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                return time.perf_counter() - start
    raise RuntimeError("no token")


def bearer(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def quiet_tenant(url: str, model: str, samples: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=bearer("quiet")) as client:
        times = [await ttft(client, model) for _ in range(samples)]
    return {"ttft_p50_s": round(statistics.median(times), 3), "ttft_p95_s": round(percentile(times, 95), 3)}


async def noisy(url: str, model: str, body, width: int, patience_s: float, refusals: list[str]) -> None:
    """`width` requests in flight until cancelled, each given up after `patience_s`; the error codes of those
    refused go to `refusals`."""
    async with httpx.AsyncClient(base_url=url, timeout=patience_s, headers=bearer("noisy"),
                                 limits=httpx.Limits(max_connections=width)) as client:
        async def lane(lane_index: int) -> None:
            for sent in itertools.count():
                try:
                    response = await client.post("/v1/chat/completions",
                                                 json={"model": model, **body(lane_index * 10_000 + sent)})
                    pause = 0.0
                    if response.status_code >= 400:  # comes back at once: no spinning
                        refusals.append(response.json()["error"]["code"])
                        pause = float(response.headers.get("retry-after", 0.05))  # as the OpenAI SDKs wait
                except httpx.HTTPError:
                    pause = 0.0  # given up after patience_s: sent again at once, as an attacker would
                await asyncio.sleep(pause)
        await asyncio.gather(*map(lane, range(width)))


async def beside(url: str, model: str, samples: int, body, width: int, patience_s: float) -> dict:
    refusals: list[str] = []
    noise = asyncio.create_task(noisy(url, model, body, width, patience_s, refusals))
    await asyncio.sleep(1.0)  # the noise is under way
    try:
        return {**await quiet_tenant(url, model, samples),
                "noisy_refused": dict(collections.Counter(refusals))}
    finally:  # its requests are dropped mid-flight: the server aborts them, and the next phase starts clean
        noise.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await noise
        await asyncio.sleep(2.0)


def batch_invariant_cost(streams: int, max_tokens: int) -> dict:
    """Tokens/s and inter-token latency of `streams` base-model streams, bf16, without and with --batch-invariant."""
    costs = {}
    for name, flags in (("default", []), ("batch_invariant", ["--batch-invariant"])):
        os.environ.pop("SWAPYARD_API_KEYS", None)
        proc, url = start_server(["--log-level", "warning", "--dtype", "bfloat16", *flags])
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            asyncio.run(run_clients(url, [model] * 2, 8))  # warm
            run = asyncio.run(run_clients(url, [model] * streams, max_tokens, ignore_eos=True))
            costs[name] = {key: round(run[key], 3) for key in ("tokens_per_s", "ttft_p50_s", "itl_p50_s")}
        finally:
            proc.terminate()
            proc.wait()
        print(json.dumps({name: costs[name]}), flush=True)
    costs["tokens_per_s_ratio"] = round(costs["batch_invariant"]["tokens_per_s"] / costs["default"]["tokens_per_s"], 2)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--patience-s", type=float, default=2.0)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--noisy-max-in-flight", type=int, default=8)
    parser.add_argument("--cost-streams", type=int, default=16)
    parser.add_argument("--cost-max-tokens", type=int, default=64)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("server_args", nargs="*", help="extra `swapyard serve` arguments, after --")
    args = parser.parse_args()
    print(json.dumps({"host": detect_host().describe()}))
    policy = Path(tempfile.mkdtemp()) / "policy.toml"
    policy.write_text(f"[tenants.noisy]\nmax_in_flight = {args.noisy_max_in_flight}\n")
    os.environ["SWAPYARD_API_KEYS"] = ",".join(f"inference:{key} {tenant}" for tenant, key in KEYS.items())
    proc, url = start_server(["--log-level", "warning", "--max-num-seqs", str(args.max_num_seqs),
                              "--tenant-policy-file", str(policy), *args.server_args])
    try:
        model = httpx.get(f"{url}/v1/models", headers=bearer("quiet")).json()["data"][0]["id"]
        results = {"alone": asyncio.run(quiet_tenant(url, model, args.samples))}
        for name, body, width, patience in (("beside_grammars", heavy_schema, 24, args.patience_s),
                                            ("beside_flood", flood_body, args.max_num_seqs, 600),
                                            ("beside_long_prompts", long_body, 4, 600)):
            results[name] = asyncio.run(beside(url, model, args.samples, body, width, patience))
            results[name]["p95_vs_alone"] = round(results[name]["ttft_p95_s"] / results["alone"]["ttft_p95_s"], 2)
            print(json.dumps({name: results[name]}), flush=True)
    finally:
        proc.terminate()
        proc.wait()
    if not args.skip_cost:
        results["batch_invariant_cost"] = batch_invariant_cost(args.cost_streams, args.cost_max_tokens)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
