"""Throughput with 0, 1, 4 and 16 distinct adapters mixed in one workload, for each adapter kind,
and the latency of hot-registering a LoRA up to its first token.

    .venv/bin/python benchmarks/multi_adapter.py --concurrency 32 --max-tokens 64

Targets (this 2-core CPU): 16 distinct LoRAs cost at most 20% of the base model's tokens/s; registering
a LoRA and streaming its first token takes under 1 s. Every request generates exactly max_tokens
(ignore_eos), so the runs do the same work whatever the adapters make the model say.

LoRAs target PEFT's default for Llama (q_proj, v_proj) unless --lora-targets says otherwise
(e.g. all-linear); their ranks alternate 4 and 8 unless --lora-ranks gives ranks to take in turn
(`--lora-ranks 8 16 32 64` mixes four ranks in every batch). Decoding streams every weight once per
step, so an adapter costs in proportion to its size next to the base: an all-linear rank-8 LoRA is 3.6%
of this 135M model (16 of them 58%), a q/v one 0.3%.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve_throughput import one_stream, run_clients, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adapter_factory import KINDS, make_adapter  # noqa: E402  (random adapters of every kind, shared with tests)

from server.default_model import default_model_dir  # noqa: E402
from server.host import detect_host  # noqa: E402
from server.settings import DEFAULT_CACHE_DIR  # noqa: E402


async def hot_register_first_token(url: str, name: str, folder: Path) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        start = time.perf_counter()
        registered = await client.post("/v1/adapters", json={"name": name, "path": str(folder)})
        registered.raise_for_status()
        ttft, _, _ = await one_stream(client, name, "Say hello.", 4)
        return {"register_s": registered.elapsed.total_seconds(), "register_to_first_token_s":
                time.perf_counter() - start, "first_token_s": ttft}


def measure(args: argparse.Namespace, dtype: str, tmp: str, root: Path, folders: dict, hot: Path) -> dict:
    """One server in `dtype`: the base, then each kind at each adapter count, then a hot registration."""
    proc, url = start_server(["--dtype", dtype, "--data-dir", f"{tmp}/data-{dtype}", "--adapter-roots",
                              f'["{root}"]',
                              # All resident: this measures mixed serving, not loads from disk.
                              "--max-resident-adapters", str(len(folders) + 1)])
    try:
        for (kind, i), folder in folders.items():
            httpx.post(f"{url}/v1/adapters", json={"name": f"{kind}-{i}", "path": str(folder)},
                       timeout=120).raise_for_status()
        results = {"base": asyncio.run(run_clients(url, ["smollm2-135m-instruct"] * args.concurrency,
                                                   args.max_tokens, ignore_eos=True))}
        for kind in args.kinds:
            for count in args.counts:
                models = [f"{kind}-{i % count}" for i in range(args.concurrency)]
                results[f"{kind}x{count}"] = asyncio.run(run_clients(url, models, args.max_tokens, ignore_eos=True))
        results["hot_register"] = asyncio.run(hot_register_first_token(url, f"hot-{dtype}", hot))
    finally:
        proc.terminate()
        proc.wait()
    base = results["base"]["tokens_per_s"]
    for figures in results.values():
        if "tokens_per_s" in figures:
            figures["vs_base"] = round(figures["tokens_per_s"] / base, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated, or all-linear")
    parser.add_argument("--lora-ranks", type=int, nargs="+", help="LoRA i gets the (i mod count)-th")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "auto"], help="one server run per dtype")
    args = parser.parse_args()

    model_path = default_model_dir(DEFAULT_CACHE_DIR)
    print(json.dumps({"host": detect_host().describe()}))
    with tempfile.TemporaryDirectory(prefix="swapyard-bench-") as tmp:
        root = Path(tmp) / "adapters"
        targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        ranks = args.lora_ranks or [None]
        folders = {(kind, i): make_adapter(kind, model_path, root / f"{kind}-{i}", seed=i, lora_targets=targets,
                                           rank=ranks[i % len(ranks)])
                   for kind in args.kinds for i in range(max(args.counts))}
        hot = make_adapter("lora", model_path, root / "hot", seed=99)
        results = {}
        for dtype in args.dtypes:
            results[dtype] = measure(args, dtype, tmp, root, folders, hot)
            print(json.dumps({dtype: results[dtype]}, indent=2), flush=True)
    # Adapter overhead should not depend on the dtype: the vs_base ratios side by side.
    print(json.dumps({name: {dtype: results[dtype][name].get("vs_base") for dtype in args.dtypes}
                      for name in results[args.dtypes[0]] if name != "hot_register"}, indent=2))


if __name__ == "__main__":
    main()
