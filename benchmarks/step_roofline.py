"""How close the torch engine's decode step comes to its matrix products: for each row count, a decode step of the
embedded model with the engine's defaults against one with its earlier settings (float32 KV cache, transformers'
RMSNorm), interleaved step by step in one process, next to the time of the step's linear layers alone (every one
of them called in the step's order on inputs of the step's shape, so the weights stream from memory as they do in
the step). The matmul share (matmuls alone / step) is the roofline share: the rest is attention, elementwise work
and Python.

    .venv/bin/python benchmarks/step_roofline.py [--dtype auto] [--rows 1 8 32 64] [--context 100]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.default_model import default_model_dir  # noqa: E402
from server.engine.torch.model_runner import ModelRunner  # noqa: E402
from server.host import detect_host, dtype_name  # noqa: E402
from server.settings import DEFAULT_CACHE_DIR  # noqa: E402

VARIANTS = {"earlier": {"kv_cache_dtype": "float32", "fused_norms": False}, "default": {}}


def median_ms(times: list[float]) -> float:
    return sorted(times)[len(times) // 2] * 1e3


def decode_step(runner: ModelRunner, rows: int, context: int, tables: list[list[int]]):
    """A step that feeds one token to each of `rows` sequences holding `context` tokens (their blocks: `tables`)."""
    tables += [runner.cache.allocate(runner.cache.blocks_for(context + 1)) for _ in range(rows)]
    runner.forward(tables, [list(range(100, 100 + context))] * rows, [0] * rows, [None] * rows)
    return lambda: runner.forward(tables, [[5]] * rows, [context] * rows, [None] * rows)


def matmuls_only(runner: ModelRunner, rows: int):
    """Every linear layer of the step (the LM head once per sequence) on random rows, in the step's order."""
    linears = [m for m in runner.model.modules() if isinstance(m, nn.Linear)]
    inputs = {m.in_features: torch.randn(rows, 1, m.in_features, dtype=runner.dtype) for m in linears}

    @torch.inference_mode()
    def run() -> None:
        for linear in linears:
            linear(inputs[linear.in_features])
    return run


def measure(args: argparse.Namespace) -> list[dict]:
    model = default_model_dir(DEFAULT_CACHE_DIR)
    runners = {name: ModelRunner(model, device="cpu", dtype=args.dtype, max_model_len=args.context + 64,
                                 kv_cache_bytes=2**30, max_resident_adapters=2, **flags)
               for name, flags in VARIANTS.items()}
    print(f"dtype {dtype_name(runners['default'].dtype)}; KV cache: " + ", ".join(
        f"{name} {dtype_name(r.cache.kv.dtype)}" for name, r in runners.items()))
    table = []
    for rows in args.rows:
        tables = {name: [] for name in runners}
        runs = {name: decode_step(runner, rows, args.context, tables[name]) for name, runner in runners.items()}
        runs["matmuls"] = matmuls_only(runners["default"], rows)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for step in range(args.steps + 3):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if step >= 3:  # warm-up: oneDNN builds a primitive per new row count
                    times[name].append(time.perf_counter() - start)
        ms = {name: round(median_ms(t), 2) for name, t in times.items()}
        for name, runner in runners.items():
            for blocks in tables[name]:
                runner.cache.free(blocks)
        table.append({"rows": rows, **ms, "speed_up": round(ms["earlier"] / ms["default"], 2),
                      "matmul_share": round(ms["matmuls"] / ms["default"], 2)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    print(detect_host().describe(), f"threads {torch.get_num_threads()}, context {args.context} tokens")
    table = measure(args)
    print(f"\n{'rows':>4} {'earlier ms':>10} {'default ms':>10} {'speed-up':>8} {'matmuls ms':>10} {'share':>6}")
    for r in table:
        print(f"{r['rows']:4d} {r['earlier']:10.1f} {r['default']:10.1f} {r['speed_up']:7.2f}x {r['matmuls']:10.1f} "
              f"{r['matmul_share']:6.0%}")
    print(json.dumps({"host": detect_host().describe(), "context": args.context, "table": table}))


if __name__ == "__main__":
    main()
