"""The torch engine's four LoRA kernels agree with each row computed alone: rows of several adapters, rows
with no LoRA, uneven groups, adapters of one page and of several (ranks 4 to 64 in one batch), pages not
in order, and layers that only some adapters write."""

import pytest
import torch

from adapters.lora import LoraAdapter, LoraWeights
from server.engine.torch.adapter_bank import AdapterBank
from server.engine.torch.lora_stacks import (LORA_PAGE_RANK, LoraRows, lora_grouped, lora_masked, lora_segmented,
                                       lora_sparse)


@pytest.mark.parametrize("tokens", [1, 5])
def test_every_lora_kernel_matches_each_row_alone(tokens):
    torch.manual_seed(0)
    pages, d_in, d_out = 9, 24, 16
    a, b = torch.randn(pages + 1, LORA_PAGE_RANK, d_in), torch.randn(pages + 1, LORA_PAGE_RANK, d_out)
    a[0], b[0] = 0, 0  # page 0: no adapter
    a[3, 2:], b[3, 2:] = 0, 0  # a rank-2 adapter, zero-padded to the page
    adapters = {"x": (2,), "y": (5, 6, 4), "z": (3,), "w": (7, 9)}  # pages of each; y's not in order
    order = ["x", None, "y", "x", "z", "x", None, "y", "w"]
    row_pages = [adapters[name] if name else () for name in order]
    x = torch.randn(len(order), tokens, d_in)
    expected = torch.stack([sum((x[i] @ a[p].T @ b[p] for p in pages), torch.zeros(tokens, d_out))
                            for i, pages in enumerate(row_pages)])

    rows = LoraRows.of(row_pages)
    assert rows.pages == slice(2, 10) and rows.num_adapters == 4 and rows.group_pages.tolist() == [2, 5, 6, 4, 3, 7, 9]
    # Segments index by views where rows and pages run in order: z's one row and page; w's pages skip 8.
    assert [(r, p) for r, p in rows.segments() if isinstance(r, slice) and isinstance(p, slice)] == [
        (slice(4, 5), slice(3, 4))]
    for kernel in (lora_masked, lora_grouped, lora_segmented, lora_sparse):
        got = torch.zeros_like(expected)
        kernel(x, got, a, b, rows)
        torch.testing.assert_close(got, expected, msg=kernel.__name__)



def test_the_kernel_follows_the_batch_shape():
    fp32, bf16, cpu, gpu = torch.float32, torch.bfloat16, torch.device("cpu"), torch.device("cuda")

    def kernels(rows: LoraRows, tokens: int, device: torch.device = cpu) -> tuple:
        return rows.kernel(tokens, fp32, device), rows.kernel(tokens, bf16, device)

    sixteen = LoraRows.of([(row % 16 + 1,) for row in range(32)])  # 16 rank-8 LoRAs: 128 columns
    # Sparse on a CPU, up to 128 token rows: float32 from 64 columns, and bf16 decode of two or more LoRAs (on
    # float32 copies of the stacks).
    assert kernels(sixteen, 1) == (lora_sparse, lora_sparse) and kernels(sixteen, 4) == (lora_sparse, lora_grouped)
    assert kernels(sixteen, 7) == (lora_grouped, lora_grouped)
    # Long float32 prefills: one matmul pair per LoRA (bf16 keeps grouped where wide, masked otherwise).
    assert kernels(sixteen, 64) == (lora_segmented, lora_grouped)
    assert kernels(sixteen, 1, gpu) == (lora_grouped, lora_masked)
    few = LoraRows.of([(row % 4 + 1,) for row in range(32)])  # 4 rank-8 LoRAs: 32 columns
    assert kernels(few, 1) == (lora_masked, lora_sparse) and kernels(few, 7) == (lora_grouped, lora_masked)
    assert kernels(few, 64) == (lora_segmented, lora_masked) and kernels(few, 64, gpu) == (lora_grouped, lora_masked)
    wide = LoraRows.of([tuple(range(1 + 8 * (row % 4), 9 + 8 * (row % 4))) for row in range(32)])  # 4 rank-64
    assert kernels(wide, 1) == (lora_sparse, lora_sparse) and kernels(wide, 1, gpu) == (lora_grouped, lora_masked)
    one = LoraRows.of([tuple(range(1, 9))] * 8)  # one rank-64 LoRA: a plain matmul, no column is another's
    assert one.num_adapters == 1 and kernels(one, 1) == kernels(one, 64) == (lora_masked, lora_masked)


@pytest.mark.parametrize("tokens", [1, 6, 64])  # sparse, grouped, segmented
def test_loras_of_mixed_ranks_share_a_batch_in_pages(tokens):
    """Ranks 4, 8, 12 and 64 loaded through the bank, batched with base rows, equal each row computed alone;
    each holds only the pages its rank needs, and a freed adapter's pages are zeroed and handed out again."""
    torch.manual_seed(0)
    d_in, d_out = 32, 24
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False))
    bank = AdapterBank(model, max_adapters=5, kv_dtype=torch.float32)
    ranks = {"r4": 4, "r64": 64, "r12": 12, "r8": 8}
    adapters = {name: LoraAdapter({"0": LoraWeights(torch.randn(r, d_in), torch.randn(d_out, r), 0.5)})
                for name, r in ranks.items()}
    residents = {name: bank.place(name, adapter) for name, adapter in adapters.items()}
    assert {name: r.pages for name, r in residents.items()} == {"r4": {"0": (1,)}, "r64": {"0": tuple(range(2, 10))},
                                                                 "r12": {"0": (10, 11)}, "r8": {"0": (12,)}}
    order = ["r64", None, "r4", "r12", "r8", "r64", None, "r4"]
    bank.bind([residents.get(name) for name in order])
    x = torch.randn(len(order), tokens, d_in)
    with torch.no_grad():
        got = model(x)
        expected = torch.stack([
            model[0].base(x[i]) + (0 if name is None else
                                   0.5 * x[i] @ adapters[name].layers["0"].a.T @ adapters[name].layers["0"].b.T)
            for i, name in enumerate(order)])
    torch.testing.assert_close(got, expected)

    bank.retire(residents["r64"])  # no sequence holds it: freed at once
    assert not bank.kinds["lora"].modules["0"].a[2:10].any()
    assert bank.place("r12b", adapters["r12"]).pages == {"0": (2, 3)}  # the lowest free pages


def test_bf16_decode_runs_sparse_on_float32_copies_that_leave_with_the_adapter():
    """A CPU engine in bf16 keeps float32 copies of its LoRA stacks, holding the same bf16-rounded weights: wide
    decode batches run the sparse kernel on them, every row equals its own computation from those weights, and
    an unloaded adapter's pages are zeroed in both copies."""
    torch.manual_seed(0)
    d_in, d_out = 32, 24
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)).to(torch.bfloat16)
    bank = AdapterBank(model, max_adapters=4, kv_dtype=torch.float32)
    ranks = {"r8": 8, "r64": 64, "r16": 16}
    adapters = {name: LoraAdapter({"0": LoraWeights(torch.randn(r, d_in), torch.randn(d_out, r), 0.5)})
                for name, r in ranks.items()}
    residents = {name: bank.place(name, adapter) for name, adapter in adapters.items()}
    wrapper = bank.kinds["lora"].modules["0"]
    assert torch.equal(wrapper.a_float32, wrapper.a.float()) and torch.equal(wrapper.b_float32, wrapper.b.float())
    order = ["r64", None, "r8", "r16", "r8", "r64"]
    bank.bind([residents.get(name) for name in order])
    assert bank.kinds["lora"].rows.layers["0"].kernel(1, torch.bfloat16, torch.device("cpu")) is lora_sparse
    x = torch.randn(len(order), 1, d_in).to(torch.bfloat16)
    with torch.no_grad():
        got = model(x)
        expected = []
        for i, name in enumerate(order):
            delta = 0.0
            if name is not None:  # the stacks' own values: A in bf16, B scaled first, then rounded to bf16
                weights = adapters[name].layers["0"]
                a, b = weights.a.to(torch.bfloat16).float(), (0.5 * weights.b).to(torch.bfloat16).float()
                delta = x[i].float() @ a.T @ b.T
            expected.append((wrapper.base(x[i]).float() + delta).to(torch.bfloat16))
    torch.testing.assert_close(got, torch.stack(expected))

    pages = residents["r64"].pages["0"]
    bank.retire(residents["r64"])
    for stack in (wrapper.a, wrapper.b, wrapper.a_float32, wrapper.b_float32):
        assert not stack[list(pages)].any()


def test_each_layer_runs_only_the_loras_that_write_it():
    """A LoRA on layer 0 only and one on both layers share a batch: layer 1 runs the second one's rows
    alone, a layer no row's LoRA writes runs none, and every row equals its own computation."""
    torch.manual_seed(0)
    width = 16
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(3)))
    bank = AdapterBank(model, max_adapters=4, kv_dtype=torch.float32)

    def lora(layers: list[str], rank: int) -> LoraAdapter:
        return LoraAdapter({layer: LoraWeights(torch.randn(rank, width), torch.randn(width, rank), 0.5)
                            for layer in layers})

    adapters = {"first": lora(["0"], 8), "both": lora(["0", "1"], 16), "last": lora(["2"], 8)}
    residents = {name: bank.place(name, adapter) for name, adapter in adapters.items()}
    order = ["first", None, "both", "first", "both"]
    bank.bind([residents.get(name) for name in order])
    rows = bank.kinds["lora"].rows.layers
    assert rows.keys() == {"0", "1"}  # no row's LoRA writes layer 2
    assert rows["1"].num_adapters == 1 and rows["1"].own.any(dim=1).tolist() == [False, False, True, False, True]
    x = torch.randn(len(order), 3, width)
    with torch.no_grad():
        got = model(x)
        expected = []
        for i, name in enumerate(order):
            h = x[i]
            for index, layer in enumerate(model):
                weights = adapters[name].layers.get(str(index)) if name else None
                h = layer.base(h) + (0 if weights is None else 0.5 * h @ weights.a.T @ weights.b.T)
            expected.append(h)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_each_projection_numbers_its_own_pages():
    """Pages are numbered per projection across layers: an MLP's range holds only the LoRAs that write MLPs,
    whatever attention-only LoRAs were loaded between them, and every row still equals its own computation."""
    torch.manual_seed(0)
    width = 16
    model = torch.nn.ModuleList(torch.nn.ModuleDict({"q": torch.nn.Linear(width, width, bias=False),
                                                     "up": torch.nn.Linear(width, width, bias=False)})
                                for _ in range(2))
    bank = AdapterBank(model, max_adapters=4, kv_dtype=torch.float32)

    def lora(projections: list[str], rank: int) -> LoraAdapter:
        return LoraAdapter({f"{layer}.{p}": LoraWeights(torch.randn(rank, width), torch.randn(width, rank), 0.5)
                            for layer in range(2) for p in projections})

    adapters = {"all": lora(["q", "up"], 8), "q-only": lora(["q"], 16), "all2": lora(["q", "up"], 8)}
    residents = {name: bank.place(name, adapter) for name, adapter in adapters.items()}
    assert {name: r.pages for name, r in residents.items()} == {
        "all": {"*.q": (1,), "*.up": (1,)}, "q-only": {"*.q": (2, 3)}, "all2": {"*.q": (4,), "*.up": (2,)}}
    order = ["all", None, "q-only", "all2", "q-only"]
    bank.bind([residents.get(name) for name in order])
    layers = bank.kinds["lora"].rows.layers
    assert (layers["1.q"].pages, layers["1.up"].pages) == (slice(1, 5), slice(1, 3))
    x = torch.randn(len(order), 3, width)
    with torch.no_grad():
        got = x
        for layer in model:
            got = layer["up"](layer["q"](got))
        expected = []
        for i, name in enumerate(order):
            h = x[i]
            for index, layer in enumerate(model):
                for p in ("q", "up"):
                    weights = adapters[name].layers.get(f"{index}.{p}") if name else None
                    h = layer[p].base(h) + (0 if weights is None else 0.5 * h @ weights.a.T @ weights.b.T)
            expected.append(h)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-4)
