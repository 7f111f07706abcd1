"""Many adapters at S-LoRA scale: far more registered than device slots, open-loop traffic spread over them.

    .venv/bin/python benchmarks/many_adapters.py --loras 1000 --others 50 --requests 400

Registers --loras LoRAs (ranks 8-64 mixed, q/v and all-linear mixed) plus --others each of prefix, prompt
and bottleneck adapters on a server with --max-resident-adapters 16 slots. Measures the base model's
capacity (closed loop, --concurrency streams), then sends the same open-loop Poisson arrivals at --load of
that capacity twice: once with each request's adapter drawn Zipf(--zipf) over all adapters, once with
every request on the base model. Every request generates exactly --max-tokens tokens (ignore_eos).
Reports tokens/s, TTFT p50/p95/p99, refused requests, and the share of requests that waited for an
adapter load (swapyard_adapter_wait_seconds' count), and the slot demand (`slot_demand`) of the adapters'
run and of the same arrivals at base speed. Targets on this CPU: zero refused, tokens/s >= 0.8 of
base-only, TTFT p95 <= 2x base-only.

Adapters are random and cheap to make: one template per kind and LoRA shape, copied with new random
weights of the template's scale, so 1,000 take a minute rather than 1,000 model loads.
"""

import argparse
import asyncio
import json
import random
from collections import Counter
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

from serve_throughput import one_stream, percentile, prompts, run_clients, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from adapter_factory import make_adapter, make_peft_adapter  # noqa: E402

from adapters.base import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from server.default_model import DEFAULT_MODEL_NAME, default_model_dir  # noqa: E402
from server.host import detect_host  # noqa: E402
from server.settings import DEFAULT_CACHE_DIR  # noqa: E402

LORA_RANKS = {8: 0.5, 16: 0.3, 32: 0.15, 64: 0.05}  # most adapters are small, as in S-LoRA's workloads
LORA_TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
# Counters summed over adapters: requests that waited for a load (and how long), loads (and how long); and
# per phase: engine steps (their time and sequences).
PHASES = ("prefill", "decode", "mixed")
TALLIES = ("swapyard_adapter_wait_seconds_count", "swapyard_adapter_wait_seconds_sum",
           "swapyard_adapter_load_seconds_count", "swapyard_adapter_load_seconds_sum",
           *(f'swapyard_engine_{name}{{phase="{phase}"}}' for phase in PHASES
             for name in ("step_seconds_count", "step_seconds_sum", "batch_size_sum")))


def make_adapters(root: Path, args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(name, folder) for every adapter: templates made once, then copies with fresh random weights."""
    model_path, rng = default_model_dir(DEFAULT_CACHE_DIR), random.Random(args.seed)
    ranks = {rank: share for rank, share in LORA_RANKS.items() if rank <= args.max_rank}
    targets_share = {"qv": 1 - args.all_linear_share, "all-linear": args.all_linear_share}
    templates = {("lora", rank, targets): make_peft_adapter("lora", model_path, root / f"t-lora-{rank}-{targets}",
                                                            rank=rank, lora_targets=LORA_TARGETS[targets])
                 for rank in ranks for targets in LORA_TARGETS}
    templates |= {(kind,): make_adapter(kind, model_path, root / f"t-{kind}") for kind in ("prefix", "prompt",
                                                                                          "bottleneck")}
    plan = [("lora", rng.choices(list(ranks), weights=list(ranks.values()))[0],
             rng.choices(list(targets_share), weights=list(targets_share.values()))[0])
            for _ in range(args.loras)]
    plan += [(kind,) for kind in ("prefix", "prompt", "bottleneck") for _ in range(args.others)]
    made = []
    for index, key in enumerate(plan):
        name, template = f"{'-'.join(map(str, key))}-{index}", templates[key]
        folder = root / name
        folder.mkdir()
        (folder / CONFIG_FILE).write_bytes((template / CONFIG_FILE).read_bytes())
        generator = torch.Generator().manual_seed(args.seed + index)
        weights = {key: torch.randn(tensor.shape, generator=generator) * tensor.float().std().clamp_min(1e-3)
                   for key, tensor in load_file(template / WEIGHTS_FILE).items()}
        save_file(weights, folder / WEIGHTS_FILE)
        made.append((name, folder))
    return made


async def register_all(url: str, adapters: list[tuple[str, Path]]) -> float:
    start, limit = time.perf_counter(), asyncio.Semaphore(4)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def register(name: str, folder: Path) -> None:
            async with limit:
                (await client.post("/v1/adapters", json={"name": name, "path": str(folder)})).raise_for_status()
        await asyncio.gather(*(register(name, folder) for name, folder in adapters))
    return time.perf_counter() - start


def zipf_choices(names: list[str], alpha: float, count: int, rng: random.Random) -> list[str]:
    """`count` draws with P(rank k) proportional to 1/k^alpha, over `names` in a random popularity order."""
    ranked = names[:]
    rng.shuffle(ranked)
    return rng.choices(ranked, weights=[1 / (k + 1) ** alpha for k in range(len(ranked))], k=count)


def tallies(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {name: sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name)) for name in TALLIES}


async def open_loop(url: str, models: list[str], gaps: list[float], max_tokens: int) -> dict:
    """Request i starts gaps[0] + ... + gaps[i] seconds in, whatever the earlier ones are doing."""
    texts = prompts(len(models))
    limits = httpx.Limits(max_connections=len(models))
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def one(index: int, delay: float) -> tuple[float, int, float] | int:
            """(TTFT, tokens, when it ended), or the status code of a refusal."""
            await asyncio.sleep(delay)
            try:
                ttft, _, tokens = await one_stream(client, models[index], texts[index], max_tokens, ignore_eos=True)
            except httpx.HTTPStatusError as exc:
                return exc.response.status_code
            return ttft, tokens, time.perf_counter() - start

        delays, total = [], 0.0
        for gap in gaps:
            total += gap
            delays.append(total)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(i, d) for i, d in enumerate(delays)))
        wall = time.perf_counter() - start
    served = [r for r in results if isinstance(r, tuple)]
    ttfts = [r[0] for r in served]
    tokens = sum(r[1] for r in served)
    refused = Counter(r for r in results if isinstance(r, int))
    spans = [(delay, r[2]) if isinstance(r, tuple) else None for delay, r in zip(delays, results)]
    return {"requests": len(models), "refused": dict(refused), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(percentile(ttfts, 50), 3), "ttft_p95_s": round(percentile(ttfts, 95), 3),
            "ttft_p99_s": round(percentile(ttfts, 99), 3), "wall_s": round(wall, 1), "spans": spans}


def slot_demand(models: list[str], spans: list[tuple[float, float] | None], slots: int) -> dict:
    """What the arrivals ask of the device slots, from one run's request lifetimes (arrival to last token):
    at each arrival, the distinct adapters that other requests in flight hold (an adapter holds its slot while
    any of its requests runs). An arrival whose adapter is not among them while `slots` or more are must wait
    for a slot, whatever the scheduler, kernels or load path. Poisson arrivals see time averages, so these
    are also the shares of time."""
    held, blocked = [], 0
    if not any(spans):
        return {}
    for i, (model, span) in enumerate(zip(models, spans)):
        if span is None:
            continue
        others = {models[j] for j, other in enumerate(spans)
                  if j != i and other is not None and other[0] <= span[0] < other[1]}
        held.append(len(others))
        blocked += model not in others and len(others) >= slots
    return {"adapters_in_flight_mean": round(sum(held) / len(held), 1),
            "adapters_in_flight_p95": round(percentile(held, 95), 1), "slots": slots,
            "arrivals_finding_every_slot_held": round(blocked / len(held), 3)}


def resident_slots(server_args: list[str]) -> int:
    """The server's --max-resident-adapters (16, its default, when not given)."""
    if "--max-resident-adapters" in server_args:
        return int(server_args[server_args.index("--max-resident-adapters") + 1])
    return 16


def measured_open_loop(url: str, models: list[str], gaps: list[float], max_tokens: int) -> tuple[dict, list[float]]:
    """`open_loop`, with the engine's steps in that time (how busy, how wide), and the adapter tallies."""
    before = tallies(url)
    result = asyncio.run(open_loop(url, models, gaps, max_tokens))
    after = tallies(url)
    counts = [after[name] - before[name] for name in TALLIES]
    adapters, engine = counts[:4], counts[4:]
    result["engine_busy_share"] = round(sum(engine[1::3]) / result["wall_s"], 3)
    for phase, (steps, step_s, rows) in zip(PHASES, (engine[i : i + 3] for i in range(0, len(engine), 3))):
        result[phase] = {"steps": int(steps), "mean_step_ms": round(1000 * step_s / max(steps, 1), 1),
                         "mean_batch": round(rows / max(steps, 1), 1)}
    return result, adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=int, default=1000)
    parser.add_argument("--others", type=int, default=50, help="adapters of each of prefix, prompt, bottleneck")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32, help="streams of the capacity measurement")
    parser.add_argument("--load", type=float, default=0.7, help="arrival rate as a share of base capacity")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rank", type=int, default=64, help="LoRA ranks drawn from 8, 16, 32, 64 up to this")
    parser.add_argument("--all-linear-share", type=float, default=0.3, help="LoRAs on every linear layer (else q/v)")
    parser.add_argument("server_args", nargs="*", help="`swapyard serve` arguments, after -- "
                                                       "(default: --max-resident-adapters 16)")
    args = parser.parse_args()
    print(json.dumps({"host": detect_host().describe()}), flush=True)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="swapyard-many-") as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        start = time.perf_counter()
        adapters = make_adapters(root, args)
        print(json.dumps({"adapters_made": len(adapters), "make_s": round(time.perf_counter() - start, 1)}),
              flush=True)
        proc, url = start_server(["--data-dir", f"{tmp}/data", "--adapter-roots", json.dumps([str(root)]),
                                  "--max-model-len", "1024", *(args.server_args or ["--max-resident-adapters",
                                                                                    "16"])])
        try:
            register_s = asyncio.run(register_all(url, adapters))
            print(json.dumps({"registered": len(adapters), "register_s": round(register_s, 1)}), flush=True)
            capacity = asyncio.run(run_clients(url, [DEFAULT_MODEL_NAME] * args.concurrency, args.max_tokens,
                                               ignore_eos=True))
            rate = args.load * capacity["tokens_per_s"] / args.max_tokens  # requests per second
            gaps = [rng.expovariate(rate) for _ in range(args.requests)]
            models = zipf_choices([name for name, _ in adapters], args.zipf, args.requests, rng)
            mixed, (waits, waited, loads, loading) = measured_open_loop(url, models, gaps, args.max_tokens)
            mixed |= {"waited_for_load_share": round(waits / args.requests, 3), "loads": int(loads),
                      "mean_wait_s": round(waited / max(waits, 1), 3), "mean_load_s": round(loading / max(loads, 1), 4)}
            mixed["distinct_adapters"] = len(set(models))
            base, _ = measured_open_loop(url, [DEFAULT_MODEL_NAME] * args.requests, gaps, args.max_tokens)
            # The same arrivals, each with its adapter: served at the adapters' speed, and at the base's (a lower
            # bound on what any engine meets with this many slots).
            slots = resident_slots(args.server_args)
            mixed["slot_demand"] = slot_demand(models, mixed.pop("spans"), slots)
            base["slot_demand_at_base_speed"] = slot_demand(models, base.pop("spans"), slots)
        finally:
            proc.terminate()
            proc.wait()
    report = {"base_capacity_tokens_per_s": round(capacity["tokens_per_s"], 1), "arrival_rate_per_s": round(rate, 2),
              "adapters": mixed, "base_only": base,
              "tokens_per_s_vs_base": round(mixed["tokens_per_s"] / base["tokens_per_s"], 3),
              "ttft_p95_vs_base": round(mixed["ttft_p95_s"] / base["ttft_p95_s"], 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
