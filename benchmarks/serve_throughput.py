"""N concurrent streaming clients against `swapyard serve` in float32 and in `--dtype auto`, side by side,
beside plain `model.generate` on the same prompts.

    .venv/bin/python benchmarks/serve_throughput.py --concurrency 32 --max-tokens 128

Starts one server per dtype as a subprocess (so the clients do not share its GIL) unless --url is given,
and prints tokens/s, TTFT p50/p95 and ITL p50/p95 as seen by the clients, every request generating
exactly --max-tokens tokens (greedy, or sampled with --sampling model|openai); then times the same
prompts through transformers' `generate` in one batch (the baseline the torch engine must beat 2x at 32
streams). Targets for `auto` against float32: >= 1.7x on an AMX host, equal on an AVX2-only one (where
auto is float32). The host is printed first.
"""

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx

from server.host import detect_host

TOPICS = ["a cat", "the sea", "a robot", "an old tree", "a river", "a king", "a ship", "a bird", "the moon",
          "a city", "a mountain", "a library", "a garden", "a train", "a storm", "a baker"]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (version {i // len(TOPICS) + 1})."
            for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                     ignore_eos: bool = False, extra: dict | None = None) -> tuple[float, list[float], int]:
    """One streaming chat request (plus `extra` body fields): (time to first token, gaps between tokens,
    completion tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": ignore_eos, **(extra or {})}
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    ttft = times[0] - start
    return ttft, [b - a for a, b in zip(times, times[1:])], tokens


async def run_clients(url: str, models: list[str], max_tokens: int, ignore_eos: bool = False,
                      extras: list[dict | None] | None = None) -> dict:
    """One concurrent stream per entry of `models` (request i asks models[i], with extras[i] in its body);
    client-side figures."""
    limits = httpx.Limits(max_connections=len(models))
    extras = extras or [None] * len(models)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_stream(client, models[0], "Hi", 4, extra=extras[0])  # warm-up (compiles a grammar once)
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, m, p, max_tokens, ignore_eos, extra)
                                         for m, p, extra in zip(models, prompts(len(models)), extras)))
        wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    itls = [x for r in results for x in r[1]]
    tokens = sum(r[2] for r in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "itl_p50_s": percentile(itls, 50), "itl_p95_s": percentile(itls, 95)}


def generate_baseline(model_path: str, concurrency: int, max_tokens: int) -> dict:
    """The same prompts through `model.generate` in one left-padded batch, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts(concurrency)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
    wall = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    # Count each row up to and including its first EOS: padding after it is not useful work.
    tokens = sum(int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else len(row) for row in new)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`swapyard serve` in a subprocess on a free port; returns it and its URL once ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port), *extra])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # /ready answers 503 at once while the model loads: do not spin
    proc.kill()
    raise SystemExit("server did not start")


# Request fields per --sampling; streams send temperature 0 unless told otherwise (None: the server's default).
SAMPLING = {"greedy": {}, "model": {"temperature": None}, "openai": {"temperature": 1.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the model.generate baseline")
    parser.add_argument("--model", help="HF model folder (default: the embedded model)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "auto"], help="one server run per dtype")
    parser.add_argument("--sampling", choices=SAMPLING, default="greedy",
                        help="greedy; model: the model's generation_config.json defaults (SmolLM2: temperature "
                             "0.2, top_p 0.9), what a request that leaves them out gets; openai: temperature 1")
    parser.add_argument("server_args", nargs="*", help="extra `swapyard serve` arguments, after --")
    args = parser.parse_args()
    print(json.dumps({"host": detect_host().describe(), "sampling": args.sampling}))
    runs = [(None, args.url)] if args.url else [(dtype, None) for dtype in args.dtypes]
    results = {}
    for dtype, url in runs:
        proc = None
        if url is None:
            proc, url = start_server((["--model", args.model] if args.model else []) + ["--dtype", dtype]
                                     + args.server_args)
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]
            results[dtype or url] = asyncio.run(run_clients(url, [model["id"]] * args.concurrency, args.max_tokens,
                                                            ignore_eos=True,
                                                            extras=[SAMPLING[args.sampling]] * args.concurrency))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
        print(json.dumps({dtype or url: results[dtype or url]}, indent=2), flush=True)
    if len(results) > 1:
        first, *others = results
        print(json.dumps({f"{other}_vs_{first}": results[other]["tokens_per_s"] / results[first]["tokens_per_s"]
                          for other in others}))
    if not args.no_baseline:
        from server.default_model import default_model_dir
        from server.settings import DEFAULT_CACHE_DIR

        path = args.model or str(default_model_dir(DEFAULT_CACHE_DIR))
        baseline = generate_baseline(path, args.concurrency, args.max_tokens)
        print(json.dumps({"generate_baseline": baseline} | {
            f"{name}_vs_generate": served["tokens_per_s"] / baseline["tokens_per_s"]
            for name, served in results.items()}, indent=2))


if __name__ == "__main__":
    main()
