"""The torch engine's two LoRA kernels on this CPU, per batch shape: masked (every row through every page
in the batch's range, one matmul) and grouped (rows gathered by page, one batched matmul per projection).
The engine picks grouped for float32 prefill, and once the masked matmul is GROUPED_MIN_COLUMNS wide (in
bf16 for prefill only).

    .venv/bin/python benchmarks/lora_kernels.py [--dtype bfloat16]
"""

import argparse
import time

import torch

from server.engine.adapter_bank import GROUPED_MIN_COLUMNS, LORA_PAGE_RANK, LoraRows, lora_grouped, lora_masked
from server.host import detect_host

# (rows, tokens per row, distinct slots, rank, in, out): decode and prefill at SmolLM2's 576/1536 widths.
SHAPES = [(32, 1, 1, 8, 576, 1536), (32, 1, 4, 8, 576, 1536), (32, 1, 16, 8, 576, 576), (32, 1, 16, 8, 576, 1536),
          (32, 1, 16, 8, 1536, 576), (32, 1, 16, 64, 576, 1536), (8, 1, 8, 8, 576, 1536),
          (4, 128, 4, 8, 576, 1536), (4, 128, 4, 8, 1536, 576), (16, 64, 16, 8, 576, 1536)]


def microseconds(run, repeats: int = 200) -> float:
    for _ in range(10):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e6


def time_shape(batch: int, tokens: int, slots: int, rank: int, d_in: int, d_out: int) -> str:
    per = rank // LORA_PAGE_RANK  # pages of each adapter
    a, b = torch.randn(slots * per + 1, LORA_PAGE_RANK, d_in), torch.randn(slots * per + 1, LORA_PAGE_RANK, d_out)
    x, y, w = torch.randn(batch, tokens, d_in), torch.zeros(batch, tokens, d_out), torch.randn(d_out, d_in)
    rows = LoraRows.of([tuple(range(1 + row % slots * per, 1 + (row % slots + 1) * per)) for row in range(batch)])
    base = microseconds(lambda: x @ w.T)
    masked = microseconds(lambda: lora_masked(x, y, a[1:], b[1:], rows))
    grouped = microseconds(lambda: lora_grouped(x, y, a, b, rows))
    chosen = "grouped" if rows.is_grouped(tokens, x.dtype) else "masked"
    return (f"{batch:4d} {tokens:6d} {slots:5d} {rank:4d} {d_in:5d}->{d_out:<5d} {base:8.0f} {masked:10.0f} "
            f"{grouped:11.0f}  {chosen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    torch.set_default_dtype(getattr(torch, parser.parse_args().dtype))
    print(detect_host().describe(), torch.get_default_dtype())
    print(f"threads {torch.get_num_threads()}; grouped: float32 prefill, and from {GROUPED_MIN_COLUMNS} columns "
          "(bf16: prefill only)")
    print("rows tokens slots rank  in->out    base_us  masked_us  grouped_us  chosen")
    torch.manual_seed(0)
    for shape in SHAPES:
        print(time_shape(*shape))


if __name__ == "__main__":
    main()
