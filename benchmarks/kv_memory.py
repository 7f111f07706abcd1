"""The torch engine's KV memory: do requests that omit `max_tokens` (OpenAI clients' default) cost more
than the same requests with a tight `max_tokens`?

    .venv/bin/python benchmarks/kv_memory.py --concurrency 64 --kv-cache-memory-gb 1

Starts one `swapyard serve` (float32, the given KV budget) and sends the same --concurrency chat requests
for short answers twice, all at once, greedy: first without `max_tokens`, then with `max_tokens` = --tight
(`tokens` says how much the cap cut). Prints wall time, TTFT, latency and ITL for each and the wall-time
ratio (target: within 1.2x), with the preemptions the pool needed. The host is printed first. (Issue 18's
shared-prefix and long-prompt measurements are not in this script yet.)
"""

import argparse
import asyncio
import json
import time

import httpx

from serve_throughput import one_stream, percentile, start_server
from server.default_model import DEFAULT_MODEL_NAME
from server.host import detect_host


QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello.",
             "What is the largest ocean?", "Name a fruit.", "What colour is the sky?", "Count to five."]


async def short_answers(url: str, concurrency: int, max_tokens: int | None) -> dict:
    """`concurrency` chat requests for short answers, all at once, greedy; client-side figures."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, DEFAULT_MODEL_NAME, QUESTIONS[i % len(QUESTIONS)],
                                                    max_tokens) for i in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts, itls = [r[0] for r in results], [x for r in results for x in r[1]]
    return {"tokens": sum(r[2] for r in results), "wall_s": wall, "ttft_p50_s": percentile(ttfts, 50),
            "latency_p50_s": percentile([r[0] + sum(r[1]) for r in results], 50), "itl_p95_s": percentile(itls, 95)}


def preemptions(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("swapyard_engine_preemptions_total "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    parser.add_argument("--tight", type=int, default=64, help="max_tokens of the second run")
    args = parser.parse_args()
    print(json.dumps({"host": detect_host().describe()}))
    proc, url = start_server(["--dtype", "float32", "--kv-cache-memory-gb", str(args.kv_cache_memory_gb),
                              "--max-num-seqs", str(args.concurrency)])
    try:
        results = {}
        for name, max_tokens in (("max_tokens omitted", None), (f"max_tokens {args.tight}", args.tight)):
            before = preemptions(url)
            results[name] = asyncio.run(short_answers(url, args.concurrency, max_tokens))
            results[name]["preemptions"] = preemptions(url) - before
        omitted, tight = results.values()
        results["wall ratio (omitted / tight)"] = omitted["wall_s"] / tight["wall_s"]
        print(json.dumps(results, indent=2))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
