"""What an online merge buys: tokens/s of one LoRA served as a LoRA, then merged into the base weights
(POST /v1/adapters/{name}/merge), and what the base pays while it is merged (a compensating LoRA).

    .venv/bin/python benchmarks/merge.py --engine torch --concurrency 32 --max-tokens 64
    .venv/bin/python benchmarks/merge.py --engine vllm --concurrency 32 --max-tokens 64

The LoRA is random, rank 8 on every linear layer (the costly case for the torch engine).
"""

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx

from serve_throughput import run_clients, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adapter_factory import make_adapter  # noqa: E402  (random adapters, shared with the tests)

from server.default_model import DEFAULT_MODEL_NAME, default_model_dir  # noqa: E402
from server.host import detect_host  # noqa: E402
from server.settings import DEFAULT_CACHE_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="swapyard-merge-bench-"))
    folder = make_adapter("lora", default_model_dir(DEFAULT_CACHE_DIR), tmp / "lora")
    # Speed only: in bf16 without --batch-invariant the merge keeps other answers close, not exact.
    proc, url = start_server(["--engine", args.engine, "--data-dir", str(tmp / "data"), "--allow-inexact-merge",
                              "--adapter-roots", json.dumps([str(tmp)])])

    def tokens_per_s(model: str) -> float:
        r = asyncio.run(run_clients(url, [model] * args.concurrency, args.max_tokens, ignore_eos=True))
        return round(r["tokens_per_s"], 1)

    try:
        assert httpx.post(f"{url}/v1/adapters", json={"name": "hot", "path": str(folder)}).status_code == 201
        tokens_per_s("hot")  # warm-up
        results = {"base": tokens_per_s(DEFAULT_MODEL_NAME), "lora as a LoRA": tokens_per_s("hot")}
        assert httpx.post(f"{url}/v1/adapters/hot/merge", timeout=300).status_code == 200
        results["lora merged"] = tokens_per_s("hot")
        results["base while merged"] = tokens_per_s(DEFAULT_MODEL_NAME)
        print(json.dumps({"host": detect_host().describe(), "engine": args.engine, "concurrency": args.concurrency,
                          "max_tokens": args.max_tokens, "tokens_per_s": results}, indent=2))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
