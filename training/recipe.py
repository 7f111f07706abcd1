"""The training recipe, written out: setup -> train (epochs of steps, evaluation, checkpoint) -> save.

Nothing is written before the data has been validated. Each epoch ends in a checkpoint
(checkpoints/epoch-N: the adapter plus optimizer, scheduler and RNG state), so an interrupted run
started again with the same `out` continues after the last finished epoch.
"""

import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from server.default_model import ensure_default_model
from server.host import detect_host, dtype_name, resolve_dtype
from training.config import TrainConfig
from training.hyperparameters import resolve, steps_per_epoch
from training.data import batches
from training.methods import build_optimizer, build_trainable, compute_in
from training.objectives import build_objective
from training.report import RESULTS_FILE, MetricsLog, model_card, plot_losses, write_results

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


class TrainingCancelled(Exception):
    pass


def _last_checkpoint(out: Path) -> tuple[int, Path] | None:
    done = [(int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("epoch-*") if (p / STATE_FILE).exists()]
    return max(done) if done else None


def training_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The serving rule (bf16 where the host multiplies it fast), but float32 for float16: without a loss
    scaler its gradients underflow."""
    dtype = resolve_dtype(requested, device)
    return torch.float32 if dtype == torch.float16 else dtype


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(config: TrainConfig, on_event: Callable[[dict], None] = lambda event: None,
          should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Run the recipe; returns the summary also written to the model card."""
    # -- setup ---------------------------------------------------------------------------------------------
    model_path = config.model or ensure_default_model(config.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    objective = build_objective(config, tokenizer, pad_id, device)
    train_set, warnings = objective.load(config.data)
    val_set = []
    if config.validation is not None:
        val_set, val_warnings = objective.load(config.validation)
        warnings += val_warnings
    for warning in warnings:
        log.warning(warning)
        on_event({"level": "warn", "message": warning})

    hyper = resolve(config, len(train_set))
    objective.hyper = hyper
    resolved = hyper.model_dump(exclude_none=True)
    on_event({"level": "info", "message": "hyperparameters: " + ", ".join(f"{k}={v:g}" for k, v in resolved.items()),
              "data": {"hyperparameters": resolved}})
    torch.manual_seed(config.seed)
    dtype = training_dtype(config.dtype, device)
    log.info("training in %s (dtype %s; CPU %s, %s)", dtype_name(dtype), config.dtype, detect_host().cpu_model,
             detect_host().isa)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    if config.init_adapter is None:  # the reference: the base alone, before the adapter is attached
        objective.prepare(model, [train_set, val_set], hyper.batch_size, should_stop,
                          autocast=lambda: compute_in(device, dtype))
    trainable = build_trainable(model, config)
    if config.init_adapter is not None:  # the reference: the adapter it starts from, before any step
        objective.prepare(trainable.model, [train_set, val_set], hyper.batch_size, should_stop,
                          virtual=trainable.num_virtual_tokens, autocast=trainable.autocast)
    if should_stop():
        raise TrainingCancelled("cancelled before training")
    optimizer = build_optimizer(trainable, config, hyper.learning_rate)
    epoch_steps = steps_per_epoch(len(train_set), hyper.batch_size, config.gradient_accumulation_steps)
    total_steps = epoch_steps * hyper.n_epochs
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    config.out.mkdir(parents=True, exist_ok=True)
    start_epoch = 0
    resumed = _last_checkpoint(config.out) if config.resume else None
    if resumed is not None:
        start_epoch, folder = resumed
        trainable.restore(folder)
        state = torch.load(folder / STATE_FILE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        on_event({"level": "info", "message": f"resumed after epoch {start_epoch} from {folder}"})
    metrics = MetricsLog(config.out, keep_before_epoch=start_epoch)
    step, trained_tokens = start_epoch * epoch_steps, 0
    started = time.monotonic()

    # -- train ---------------------------------------------------------------------------------------------
    trainable.model.train()
    for epoch in range(start_epoch, hyper.n_epochs):
        epoch_batches = batches(train_set, hyper.batch_size, torch.Generator().manual_seed(config.seed + epoch))
        epoch_tokens, epoch_start = 0, time.monotonic()
        with tqdm(epoch_batches, desc=f"epoch {epoch + 1}/{hyper.n_epochs}", unit="batch") as bar:
            for i, batch in enumerate(bar):
                if should_stop():
                    raise TrainingCancelled(f"cancelled during epoch {epoch + 1}")
                out, step_metrics, tokens = objective.step(trainable, batch)
                (out / config.gradient_accumulation_steps).backward()
                loss = out.item()
                epoch_tokens += tokens
                if (i + 1) % config.gradient_accumulation_steps and i + 1 != len(epoch_batches):
                    continue
                torch.nn.utils.clip_grad_norm_(trainable.parameters, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                tokens_per_s = epoch_tokens / (time.monotonic() - epoch_start)
                record = {"epoch": epoch, "step": step, "train_loss": loss,
                          **{f"train_{name}": value for name, value in step_metrics.items()},
                          "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s}
                metrics.write(record)
                on_event({"level": "info", "message": f"Step {step}/{total_steps}: training loss={loss:.4f}",
                          "data": {**record, "total_steps": total_steps}})
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        trained_tokens += epoch_tokens
        if val_set:
            trainable.model.eval()
            scores = {f"valid_{name}": value
                      for name, value in objective.evaluate(trainable, val_set, hyper.batch_size).items()}
            trainable.model.train()
            metrics.write({"epoch": epoch, "step": step, **scores})
            shown = ", ".join(f"{name.replace('valid_', 'validation ').replace('_', ' ')}={value:.4f}"
                              for name, value in scores.items())
            on_event({"level": "info", "message": f"Step {step}/{total_steps}: {shown}",
                      "data": {**scores, "step": step, "total_steps": total_steps}})
        checkpoint = config.out / "checkpoints" / f"epoch-{epoch + 1}"
        trainable.save(checkpoint)
        # The state file marks a checkpoint complete, so it appears whole or not at all (write, then rename).
        partial = checkpoint / f"{STATE_FILE}.partial"
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, partial)
        partial.replace(checkpoint / STATE_FILE)
        on_event({"level": "info", "message": f"Checkpoint created at step {step} ({checkpoint.name})",
                  "data": {"checkpoint": str(checkpoint), "epoch": epoch + 1, "step": step}})

    # -- save ----------------------------------------------------------------------------------------------
    trainable.save(config.out)
    records = metrics.read()
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    evals = [r for r in records if "valid_loss" in r]
    summary = {
        "num_train_examples": len(train_set), "num_validation_examples": len(val_set),
        **resolved, "steps": step, "trained_tokens": trained_tokens, "dtype": dtype_name(dtype),
        "final_train_loss": round(train_losses[-1], 4) if train_losses else None,
        "final_valid_loss": None,  # and each validation metric, once there is one
        **{f"final_{name}": round(value, 4) for name, value in (evals[-1] if evals else {}).items()
           if name.startswith("valid_")},
        "train_seconds": round(time.monotonic() - started, 1),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
    }
    plot_losses(records, config.out / "loss.png")
    write_results(records, config.out / RESULTS_FILE)
    (config.out / "README.md").write_text(model_card(config, str(model_path), summary))
    on_event({"level": "info", "message": "training finished", "data": summary})
    return summary

