"""swapyard's torch engine (float32 and `--dtype auto`) against llama.cpp's `llama-server`, the CPU server
users would otherwise pick, on the very GGUF the embedded model is converted from (Q4_1).

    .venv/bin/python benchmarks/llama_cpp.py --build     # once: compiles llama-server (cmake, ninja, ~5 min)
    .venv/bin/python benchmarks/llama_cpp.py --concurrency 32 --max-tokens 128

The build takes llama.cpp's source from the llama-cpp-python sdist (pip download, no wheel) and picks its
ISA flags from what this CPU reports: a `-march=native` build has died with an illegal instruction on an
AMX host. Every server gets the same 32 streaming chat requests of exactly --max-tokens greedy tokens;
llama-server runs one slot per stream on --threads threads (default: every core). Target: swapyard with
auto ahead of llama-server (2.5x on an AMX host).
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from serve_throughput import free_port, run_clients, start_server

from server.default_model import gguf_path
from server.host import Host, detect_host

BUILD_DIR = Path.home() / ".cache" / "swapyard" / "llama.cpp"
SERVER_BINARY = BUILD_DIR / "build" / "bin" / "llama-server"


def isa_flags(host: Host) -> list[str]:
    """GGML's per-ISA switches for exactly what this CPU has (GGML_NATIVE off)."""
    flags = {"GGML_AVX": host.avx2, "GGML_AVX2": host.avx2, "GGML_FMA": host.avx2, "GGML_F16C": host.avx2,
             "GGML_AVX512": host.avx512, "GGML_AVX512_VNNI": host.avx512, "GGML_AVX512_BF16": host.avx512_bf16,
             "GGML_AMX_TILE": host.amx, "GGML_AMX_INT8": host.amx, "GGML_AMX_BF16": host.amx}
    return ["-DGGML_NATIVE=OFF"] + [f"-D{name}={'ON' if on else 'OFF'}" for name, on in flags.items()]


def build() -> None:
    with tempfile.TemporaryDirectory(prefix="swapyard-llama-cpp-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:",
                        "--no-deps", "-d", tmp], check=True)
        with tarfile.open(next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))) as sdist:
            sdist.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        BUILD_DIR.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["rm", "-rf", str(BUILD_DIR)], check=True)
        subprocess.run(["cp", "-r", str(source), str(BUILD_DIR)], check=True)
    subprocess.run(["cmake", "-S", str(BUILD_DIR), "-B", str(BUILD_DIR / "build"), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    *isa_flags(detect_host())], check=True)
    subprocess.run(["cmake", "--build", str(BUILD_DIR / "build"), "--target", "llama-server"], check=True)


def start_llama_server(slots: int, max_tokens: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(SERVER_BINARY), "-m", str(gguf_path()), "--port", str(port), "--parallel",
                             str(slots), "--ctx-size", str(slots * (max_tokens + 128)), "--threads", str(threads),
                             "--threads-batch", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("llama-server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="compile llama-server first")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=detect_host().cores)
    args = parser.parse_args()
    if args.build:
        build()
    print(json.dumps({"host": detect_host().describe(), "llama_server_flags": isa_flags(detect_host())}))
    results = {}
    servers = {f"swapyard {dtype}": lambda dtype=dtype: start_server(["--dtype", dtype, "--log-level", "warning"])
               for dtype in ("float32", "auto")}
    servers["llama-server Q4_1"] = lambda: start_llama_server(args.concurrency, args.max_tokens, args.threads)
    for name, start in servers.items():
        proc, url = start()
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            results[name] = asyncio.run(run_clients(url, [model] * args.concurrency, args.max_tokens,
                                                    ignore_eos=True))
        finally:
            proc.terminate()
            proc.wait()
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    llama = results["llama-server Q4_1"]["tokens_per_s"]
    print(json.dumps({f"{name}_vs_llama_server": round(r["tokens_per_s"] / llama, 3) for name, r in results.items()}))


if __name__ == "__main__":
    main()
