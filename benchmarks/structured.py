"""Structured outputs under load: 32 streams, half constrained by a JSON schema and half free, against all
free, on one server in the same run.

    .venv/bin/python benchmarks/structured.py --concurrency 32 --max-tokens 128 [-- --dtype float32]

The schema asks for a long list of strings (at least 64), so constrained streams run to --max-tokens like
the free ones and both workloads generate the same number of tokens. Target: mixed >= 0.9x all-free
tokens/s (grammar masks are computed per row on the engine thread, between forward passes).
"""

import argparse
import asyncio
import json

import httpx

from serve_throughput import run_clients, start_server

from server.host import detect_host

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
          "required": ["items"]}
CONSTRAINED = {"response_format": {"type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("server_args", nargs="*", help="extra `swapyard serve` arguments, after --")
    args = parser.parse_args()
    print(json.dumps({"host": detect_host().describe()}))
    proc, url = start_server(["--log-level", "warning", *args.server_args])
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        models = [model] * args.concurrency
        free = asyncio.run(run_clients(url, models, args.max_tokens, ignore_eos=True))
        half = [CONSTRAINED if i % 2 else None for i in range(args.concurrency)]
        mixed = asyncio.run(run_clients(url, models, args.max_tokens, ignore_eos=True, extras=half))
    finally:
        proc.terminate()
        proc.wait()
    print(json.dumps({"all_free": free, "half_json_schema": mixed,
                      "mixed_vs_free": round(mixed["tokens_per_s"] / free["tokens_per_s"], 3)}, indent=2))


if __name__ == "__main__":
    main()
