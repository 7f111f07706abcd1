"""Training speed and peak memory per method: swapyard's trainer against TRL's SFTTrainer (or, with
`--objective dpo`, its DPOTrainer) with the same PEFT config, data and hyperparameters.

    .venv/bin/pip install -e '.[bench]'       # TRL, only for this comparison
    .venv/bin/python benchmarks/train_speed.py --examples 200 [--objective dpo]

Every run is its own process (peak RSS is per process): one epoch over the bundled mascot data repeated
to --examples rows, batch size 4, loss on the assistant's tokens only, both frameworks at the same
precision (--dtype, default auto: the base in bf16 where the CPU multiplies bf16 in hardware, the adapter
in float32; TRL gets the base in that dtype and `bf16=True`). TRL has no bottleneck adapters, so that
method is measured for swapyard alone. DPO: the bundled sign-off preference pairs, beta 0.1; TRL's reference
is the base with the adapter disabled (no second copy of the model, as ours), run at every step, where swapyard
scores the reference once before training. Target: swapyard no slower than TRL.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import TrainConfig  # noqa: E402

EXAMPLES = {"sft": ROOT / "training" / "examples" / "mascot_train.jsonl",
            "dpo": ROOT / "training" / "examples" / "signoff_train.jsonl"}


def make_data(path: Path, count: int, objective: str) -> Path:
    rows = EXAMPLES[objective].read_text().splitlines()
    path.write_text("\n".join(rows[i % len(rows)] for i in range(count)) + "\n")
    return path


def run_swapyard(config: TrainConfig) -> dict:
    from training.recipe import train

    summary = train(config)
    return {"tokens": summary["trained_tokens"], "seconds": summary["train_seconds"]}


def run_trl(config: TrainConfig) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from server.default_model import ensure_default_model
    from training.hyperparameters import resolve
    from training.methods import peft_config
    from training.recipe import training_dtype

    dtype = training_dtype(config.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model_path = ensure_default_model(config.cache_dir)
    rows = [json.loads(line) for line in config.data.read_text().splitlines()]
    hyper = resolve(config, len(rows))
    common = dict(output_dir=str(config.out), num_train_epochs=hyper.n_epochs,
                  per_device_train_batch_size=hyper.batch_size, learning_rate=hyper.learning_rate,
                  lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio, seed=config.seed,
                  max_length=config.max_seq_len, save_strategy="no", report_to=[], logging_steps=10,
                  use_cpu=not torch.cuda.is_available(), bf16=dtype == torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if config.objective == "dpo":  # TRL's conversational preference format
        dataset = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                      "rejected": r["non_preferred_output"]} for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=dataset,
                             peft_config=peft_config(config), processing_class=tokenizer)
        data = trainer.train_dataset
        tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(
            data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])) * hyper.n_epochs
    else:  # prompt-completion form: TRL applies the chat template and puts the loss on the completion only
        dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(completion_only_loss=True, **common), train_dataset=dataset,
                             peft_config=peft_config(config), processing_class=tokenizer)
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * hyper.n_epochs
    start = time.monotonic()
    trainer.train()
    return {"tokens": tokens, "seconds": time.monotonic() - start}


def one(framework: str, method: str, dtype: str, objective: str, data: Path, out: Path) -> None:
    config = TrainConfig(method=method, objective=objective, data=data, out=out, epochs=1, batch_size=4,
                         resume=False, dtype=dtype)
    result = (run_swapyard if framework == "swapyard" else run_trl)(config)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["lora", "prefix", "prompt", "bottleneck"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--objective", default="sft", choices=["sft", "dpo"])
    parser.add_argument("--one", nargs=2, metavar=("FRAMEWORK", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one, args.dtype, args.objective, args.data, args.out)
        return
    import torch

    from server.host import detect_host, dtype_name
    from training.recipe import training_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"host": detect_host().describe(dtype=dtype_name(training_dtype(args.dtype, device)))}))
    results = {}
    with tempfile.TemporaryDirectory(prefix="swapyard-train-bench-") as tmp:
        data = make_data(Path(tmp) / "train.jsonl", args.examples, args.objective)
        for method in args.methods:
            for framework in ("swapyard", "trl") if method != "bottleneck" else ("swapyard",):
                proc = subprocess.run([sys.executable, __file__, "--one", framework, method, "--dtype", args.dtype,
                                       "--objective", args.objective, "--data", str(data),
                                       "--out", f"{tmp}/{framework}-{method}"],
                                      capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:  # recorded, not fatal: one framework failing a method says something too
                    errors = [x for x in proc.stderr.splitlines() if "Error" in x] or ["no result printed"]
                    run = {"error": errors[-1]}
                else:
                    run = json.loads(line[7:])
                    run["tokens_per_s"] = round(run["tokens"] / run["seconds"], 1)
                results[f"{method}/{framework}"] = run
                print(method, framework, run, flush=True)
        for method in args.methods:
            if "tokens_per_s" in results.get(f"{method}/trl", {}):
                ratio = results[f"{method}/swapyard"]["tokens_per_s"] / results[f"{method}/trl"]["tokens_per_s"]
                results[f"{method}/speedup_vs_trl"] = round(ratio, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
