"""The torch engine's four LoRA kernels on this CPU, per batch shape: masked (every row through every page
in the batch's range, one matmul), sparse (only each row's own columns: SDDMM then SpMM, in float32),
grouped (rows gathered by page, one batched matmul per projection) and segmented (one matmul pair per LoRA
over its own rows and pages), with the one the engine picks (see SPARSE_MIN_COLUMNS, GROUPED_MIN_COLUMNS
and SEGMENTED_MIN_TOKENS in server/engine/torch/lora_stacks.py). torch's CPU sparse kernels
take float32 only: with --dtype bfloat16 the sparse column runs on the float32 copies of the stacks that a
bf16 CPU engine keeps, converting the activations in and adding into the bf16 output (both counted).

    .venv/bin/python benchmarks/lora_kernels.py [--dtype bfloat16]
"""

import argparse
import time

import torch

from server.engine.torch.lora_stacks import (GROUPED_MIN_COLUMNS, LORA_PAGE_RANK, SEGMENTED_MIN_TOKENS, SPARSE_MAX_ROWS,
                                       SPARSE_MIN_COLUMNS, LoraRows, lora_grouped, lora_masked, lora_segmented,
                                       lora_sparse)
from server.host import detect_host

# (rows, tokens per row, distinct slots, rank, in, out): decode and prefill at SmolLM2's 576/1536 widths.
SHAPES = [(32, 1, 1, 8, 576, 1536), (32, 1, 4, 8, 576, 1536), (32, 1, 16, 8, 576, 576), (32, 1, 16, 8, 576, 1536),
          (32, 1, 16, 8, 1536, 576), (32, 1, 16, 64, 576, 1536), (8, 1, 8, 8, 576, 1536),
          (4, 128, 4, 8, 576, 1536), (4, 128, 4, 8, 1536, 576), (16, 64, 16, 8, 576, 1536), (32, 1, 2, 8, 576, 1536),
          (32, 1, 4, 8, 576, 576), (32, 1, 8, 8, 576, 1536), (32, 1, 16, 16, 576, 1536), (32, 1, 16, 32, 1536, 576),
          (16, 8, 16, 8, 576, 1536), (8, 32, 8, 8, 576, 1536), (2, 256, 2, 8, 576, 1536), (2, 256, 2, 64, 576, 1536),
          (4, 128, 4, 64, 1536, 576), (4, 16, 4, 8, 576, 1536), (8, 8, 8, 8, 576, 1536), (32, 2, 16, 8, 576, 1536)]


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
    masked = microseconds(lambda: lora_masked(x, y, a, b, rows))
    grouped = microseconds(lambda: lora_grouped(x, y, a, b, rows))
    segmented = microseconds(lambda: lora_segmented(x, y, a, b, rows))
    a32, b32 = a.float(), b.float()
    sparse = microseconds(lambda: lora_sparse(x, y, a32, b32, rows))
    chosen = rows.kernel(tokens, x.dtype, x.device).__name__.removeprefix("lora_")
    return (f"{batch:4d} {tokens:6d} {slots:5d} {rank:4d} {d_in:5d}->{d_out:<5d} {base:8.0f} {masked:10.0f} "
            f"{grouped:11.0f} {segmented:13.0f} {sparse:10.0f}  {chosen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    torch.set_default_dtype(getattr(torch, parser.parse_args().dtype))
    print(detect_host().describe(), torch.get_default_dtype())
    print(f"threads {torch.get_num_threads()}; sparse up to {SPARSE_MAX_ROWS} token rows (float32 from "
          f"{SPARSE_MIN_COLUMNS} columns, bf16 decode at any width); beyond, segmented for float32 prefill rows "
          f"of {SEGMENTED_MIN_TOKENS} tokens or more, grouped for shorter ones and from {GROUPED_MIN_COLUMNS} "
          "columns (bf16: prefill only)")
    print("rows tokens slots rank  in->out    base_us  masked_us  grouped_us  segmented_us  sparse_us  chosen")
    torch.manual_seed(0)
    for shape in SHAPES:
        print(time_shape(*shape))


if __name__ == "__main__":
    main()
