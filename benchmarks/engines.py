"""swapyard's vLLM engine vs its torch engine vs vLLM's own OpenAI server (`vllm serve --enable-lora`),
on the same workload with 0, 1 and 8 distinct LoRAs, side by side; and a mix of all four kinds (2 LoRAs,
2 soft prompts, 2 prefixes, 2 bottlenecks, round robin) on swapyard's servers, with `vllm-beside` the
vLLM engine with --torch-beside-vllm (prefixes and bottlenecks on a torch engine beside it). Each server's
memory is the PSS of its process tree after its runs (vLLM's CPU KV cache is allocated at start).

    .venv/bin/python benchmarks/engines.py --concurrency 32 --max-tokens 64

Each server runs as a subprocess with its default dtype (`auto`: bfloat16 on CPUs with bf16 matmul
hardware, float32 on others, for both engines; `vllm serve`: its own choice, bfloat16 on every CPU)
and gets the same streaming chat requests (ignore_eos, so every run does the same work). LoRAs target
q_proj/v_proj (PEFT's default), rank 4/8, as in multi_adapter.py.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from serve_throughput import run_clients, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adapter_factory import make_adapter  # noqa: E402  (random adapters, shared with the tests)

from server.default_model import DEFAULT_MODEL_NAME, default_model_dir  # noqa: E402
from server.host import detect_host  # noqa: E402
from server.settings import DEFAULT_CACHE_DIR  # noqa: E402


def start_vllm_serve(model: Path, loras: dict[str, Path], max_model_len: int) -> tuple[subprocess.Popen, str]:
    port = 8100 + int(time.time()) % 500
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
           "--served-model-name", DEFAULT_MODEL_NAME, "--max-model-len", str(max_model_len),
           "--gpu-memory-utilization", "0.5", "--enable-lora", "--max-loras", str(max(len(loras), 1)),
           "--max-lora-rank", "64", "--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("vllm serve did not start")


def workloads(url: str, names: list[str], args, kinds: list[str] | None = None) -> dict:
    runs = {f"{count} adapters": [DEFAULT_MODEL_NAME] if count == 0 else names[:count] for count in (0, 1, 8)}
    if kinds:
        runs["4 kinds"] = kinds
    results = {}
    for run, names in runs.items():
        for name in names:  # vLLM loads a LoRA on its first request: not in the timed run
            asyncio.run(run_clients(url, [name], 2))
        models = [names[i % len(names)] for i in range(args.concurrency)]
        r = asyncio.run(run_clients(url, models, args.max_tokens, ignore_eos=True))
        results[run] = {k: round(r[k], 3) for k in ("tokens_per_s", "ttft_p50_s", "ttft_p95_s")}
    return results


def memory_gb(pid: int) -> float:
    """Proportional set size of a process and its descendants (vLLM's engine core and workers)."""
    root = psutil.Process(pid)
    return round(sum(p.memory_full_info().pss for p in [root, *root.children(recursive=True)]) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--servers", nargs="+", default=["torch", "vllm", "vllm-beside", "vllm-serve"],
                        choices=["torch", "vllm", "vllm-beside", "vllm-serve"])
    args = parser.parse_args()
    model = default_model_dir(DEFAULT_CACHE_DIR)
    print(json.dumps({"host": detect_host().describe()}))
    table = {}
    with tempfile.TemporaryDirectory(prefix="swapyard-engines-") as tmp:
        root = Path(tmp) / "adapters"
        loras = {f"lora-{i}": make_adapter("lora", model, root / f"lora-{i}", seed=i,
                                           lora_targets=["q_proj", "v_proj"]) for i in range(8)}
        others = {f"{kind}-{i}": make_adapter(kind, model, root / f"{kind}-{i}", seed=i)
                  for kind in ("prompt", "prefix", "bottleneck") for i in range(2)}
        kinds = ["lora-0", "lora-1", *others]
        for server in [s for s in args.servers if s != "vllm-serve"]:
            engine = "vllm" if server == "vllm-beside" else server
            proc, url = start_server(["--engine", engine, "--max-model-len", "1024", "--data-dir",
                                      f"{tmp}/data-{server}", "--adapter-roots", json.dumps([str(root)]),
                                      "--max-loras", "8", "--log-level", "warning",
                                      *(["--torch-beside-vllm"] if server == "vllm-beside" else [])])
            try:
                for name, path in {**loras, **others}.items():
                    httpx.post(f"{url}/v1/adapters", json={"name": name, "path": str(path)},
                               timeout=120).raise_for_status()
                label = f"swapyard --engine {engine}" + (" --torch-beside-vllm" if server == "vllm-beside" else "")
                table[label] = {**workloads(url, list(loras), args, kinds), "memory_gb": memory_gb(proc.pid)}
            finally:
                proc.terminate()
                proc.wait()
            print(json.dumps(table, indent=2), flush=True)
        if "vllm-serve" in args.servers:
            proc, url = start_vllm_serve(model, loras, 1024)
            try:
                table["vllm serve --enable-lora"] = {**workloads(url, list(loras), args),
                                                     "memory_gb": memory_gb(proc.pid)}
            finally:
                proc.terminate()
                proc.wait()
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
