"""The KV cache under load: what omitting `max_tokens` costs, what a shared system prompt saves, and what a
long prompt does to the streams already decoding.

    .venv/bin/python benchmarks/kv_memory.py                 # all three parts on the torch engine
    .venv/bin/python benchmarks/kv_memory.py --parts c -- --engine vllm

(a) --concurrency chat requests for short answers, all at once, greedy, with --kv-cache-memory-gb: first
    without `max_tokens` (OpenAI clients' default), then with the tightest `max_tokens` that cuts none of
    them (the longest answer of the first run), so both generate the same tokens. Wall time, TTFT,
    latency, ITL and preemptions of each, and the wall-time ratio (target: within 1.2x).
(b) --conversations multi-turn chats (--turns each, starts staggered) that share a ~1,000-token system
    prompt, on a server with prefix caching and on one without: TTFT p50 of first and later turns, and the
    prefix-cache hit rate.
(c) --streams streams decoding when one ~3,000-token prompt arrives, on servers with each
    --max-num-batched-tokens of --budgets (a budget under the prompt's length prefills it in chunks): the
    streams' ITL p50/p95/p99/max, the worst gap while the long prompt was prefilled, and its TTFT.

Every server runs in float32; arguments after `--` go to each `swapyard serve`. The host is printed first.
"""

import argparse
import asyncio
import json
import time

import httpx
from transformers import AutoTokenizer

from serve_throughput import one_stream, percentile, start_server
from server.default_model import DEFAULT_MODEL_NAME, default_model_dir
from server.host import detect_host
from server.settings import DEFAULT_CACHE_DIR

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello.",
             "What is the largest ocean?", "Name a fruit.", "What colour is the sky?", "Count to five."]


def rules(count: int, tag: str = "") -> str:
    """Deployment instructions of about 25 tokens a rule; `tag` makes them a prefix nothing cached holds."""
    return f"{tag}You are the assistant of the city library. " + " ".join(
        f"Rule {i}: books from shelf {i} may be borrowed for {i % 5 + 1} weeks and renewed {i % 3} times."
        for i in range(count))


def metric(url: str, series: str) -> float:
    """One sample of /metrics, named as the text shows it (labels included)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{series} "):
            return float(line.split()[-1])
    return 0.0


class Server:
    """`swapyard serve` with these arguments for the length of a `with` block."""

    def __init__(self, args: list[str]):
        self.args = args

    def __enter__(self) -> str:
        self.proc, url = start_server(self.args)
        return url

    def __exit__(self, *_) -> None:
        self.proc.terminate()
        self.proc.wait()


async def short_answers(url: str, concurrency: int, max_tokens: int | None) -> dict:
    """`concurrency` chat requests for short answers, all at once, greedy; client-side figures."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, DEFAULT_MODEL_NAME, QUESTIONS[i % len(QUESTIONS)],
                                                    max_tokens) for i in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts, itls = [r[0] for r in results], [x for r in results for x in r[1]]
    return {"tokens": sum(r[2] for r in results), "longest": max(r[2] for r in results), "wall_s": wall,
            "ttft_p50_s": percentile(ttfts, 50), "latency_p50_s": percentile([r[0] + sum(r[1]) for r in results], 50),
            "itl_p95_s": percentile(itls, 95)}


def part_a(args, serve: list[str]) -> dict:
    with Server([*serve, "--kv-cache-memory-gb", str(args.kv_cache_memory_gb), "--max-num-seqs",
                 str(args.concurrency)]) as url:
        asyncio.run(short_answers(url, len(QUESTIONS), 2))  # warm-up; both runs then find the same cached blocks
        results = {}
        for name in ("max_tokens omitted", "max_tokens tight"):
            # Tight: the longest answer of the first run, so that both runs generate the same tokens.
            max_tokens = results["max_tokens omitted"]["longest"] if results else None
            before = metric(url, "swapyard_engine_preemptions_total")
            results[name] = asyncio.run(short_answers(url, args.concurrency, max_tokens))
            results[name]["preemptions"] = metric(url, "swapyard_engine_preemptions_total") - before
    omitted, tight = results.values()
    results["wall ratio (omitted / tight)"] = omitted["wall_s"] / tight["wall_s"]
    return results


async def conversations(url: str, count: int, turns: int, system: str) -> list[list[float]]:
    """`count` chats started half a second apart, each `turns` turns of a question and a short answer (the
    assistant's earlier replies canned, so every run sends the same tokens): TTFT of every turn."""
    async def chat(client: httpx.AsyncClient, index: int) -> list[float]:
        await asyncio.sleep(index * 0.5)
        messages, ttfts = [{"role": "system", "content": system}], []
        for turn in range(turns):
            messages.append({"role": "user", "content": f"{QUESTIONS[(index + turn) % len(QUESTIONS)]} (chat {index})"})
            ttft, _, _ = await one_stream(client, DEFAULT_MODEL_NAME, "", 16, extra={"messages": messages})
            ttfts.append(ttft)
            messages.append({"role": "assistant", "content": f"Here is my answer number {turn} for chat {index}."})
        return ttfts

    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(chat(client, i) for i in range(count)))


def part_b(args, serve: list[str]) -> dict:
    results = {}
    for flag in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
        with Server([*serve, flag, "--max-num-seqs", str(args.conversations)]) as url:
            ttfts = asyncio.run(conversations(url, args.conversations, args.turns, rules(40)))
            hits, queries = (metric(url, f"swapyard_prefix_cache_{n}_total") for n in ("hits", "queries"))
        results[flag] = {"ttft_p50_first_turn_s": percentile([t[0] for t in ttfts], 50),
                         "ttft_p50_later_turns_s": percentile([x for t in ttfts for x in t[1:]], 50),
                         "ttft_p50_s": percentile([x for t in ttfts for x in t], 50),
                         "hit_rate": hits / queries if queries else None}
    return results


async def long_prompt_into_streams(url: str, streams: int, long_prompt: str) -> dict:
    """`streams` greedy streams of 128 tokens; once each has its first token, the long prompt is sent."""
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=streams + 1)) as c:
        await one_stream(c, DEFAULT_MODEL_NAME, "Hi", 2)  # warm-up
        started = time.perf_counter()
        running = [asyncio.create_task(one_stream(c, DEFAULT_MODEL_NAME, f"Tell a long story about number {i}.",
                                                  128, ignore_eos=True)) for i in range(streams)]
        generated = f'swapyard_generation_tokens_total{{model="{DEFAULT_MODEL_NAME}",version=""}}'
        before = metric(url, generated)
        while metric(url, generated) < before + 2 * streams:  # the streams are prefilled and decoding
            await asyncio.sleep(0.1)
        sent = time.perf_counter()
        long_ttft, _, _ = await one_stream(c, DEFAULT_MODEL_NAME, long_prompt, 16)
        results = await asyncio.gather(*running)
    gaps = [g for r in results for g in r[1]]
    return {"itl_p50_s": percentile(gaps, 50), "itl_p95_s": percentile(gaps, 95), "itl_p99_s": percentile(gaps, 99),
            "itl_max_s": max(gaps), "long_prompt_ttft_s": long_ttft, "long_prompt_sent_after_s": sent - started}


def part_c(args, serve: list[str]) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(DEFAULT_CACHE_DIR))
    results = {}
    for budget in args.budgets:
        long_prompt = rules(120, tag=f"Branch {time.time_ns()}. ")  # new to every server's cache
        length = len(tokenizer.apply_chat_template([{"role": "user", "content": long_prompt}], tokenize=True,
                                                   add_generation_prompt=True)["input_ids"])
        with Server([*serve, "--max-num-batched-tokens", str(budget), "--max-num-seqs", str(args.streams + 1)]) as url:
            results[f"--max-num-batched-tokens {budget}"] = {
                "long_prompt_tokens": length, **asyncio.run(long_prompt_into_streams(url, args.streams, long_prompt))}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices="abc", default=list("abc"))
    parser.add_argument("--concurrency", type=int, default=64, help="(a) requests at once")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="(a) the KV budget")
    parser.add_argument("--conversations", type=int, default=16, help="(b) chats sharing the system prompt")
    parser.add_argument("--turns", type=int, default=4, help="(b) turns of each chat")
    parser.add_argument("--streams", type=int, default=31, help="(c) streams decoding when the long prompt comes")
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 4096], help="(c) --max-num-batched-tokens")
    parser.add_argument("server_args", nargs="*", help="extra `swapyard serve` arguments, after --")
    args = parser.parse_args()
    print(json.dumps({"host": detect_host().describe()}), flush=True)
    serve = ["--dtype", "float32", *args.server_args]
    for part, run in (("a", part_a), ("b", part_b), ("c", part_c)):
        if part in args.parts:
            print(json.dumps({f"part {part}": run(args, serve)}, indent=2), flush=True)


if __name__ == "__main__":
    main()
