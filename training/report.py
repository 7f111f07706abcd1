"""What a run leaves beside the adapter: metrics.jsonl, results.csv, loss.png and a model card (README.md)."""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from training.config import SHAPE_FIELDS, TrainConfig  # noqa: E402

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.csv"
# OpenAI's results file: a row per step, validation columns filled where an evaluation ran.
RESULTS_COLUMNS = {"step": "step", "train_loss": "train_loss", "train_accuracy": "train_mean_token_accuracy",
                   "valid_loss": "valid_loss", "valid_mean_token_accuracy": "valid_mean_token_accuracy"}
METRIC_PREFIXES = ("train_", "valid_")  # a run's metrics, whatever its objective


class MetricsLog:
    """Append-only JSON lines; on resume, records past the restored epoch are dropped."""

    def __init__(self, out: Path, keep_before_epoch: int):
        self.path = out / METRICS_FILE
        kept = [r for r in self.read() if r["epoch"] < keep_before_epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict], path: Path) -> None:
    steps = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(*zip(*steps), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(records: list[dict], path: Path) -> None:
    rows: dict[int, dict] = {}
    for record in records:
        rows.setdefault(record["step"], {}).update(record)
    # Then the objective's own metrics (DPO's), in the order they first appear; its token accuracies stay empty.
    columns = dict(RESULTS_COLUMNS)
    for record in records:
        columns |= {k: k for k in record if k.startswith(METRIC_PREFIXES) and k not in columns.values()}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for step in sorted(rows):
            writer.writerow([_csv_value(rows[step].get(key)) for key in columns.values()])


def _csv_value(value: float | None) -> str:
    return "" if value is None else str(value) if isinstance(value, int) else f"{value:.6g}"


def model_card(config: TrainConfig, base_model: str, summary: dict) -> str:
    # A run that continued an adapter kept its shape: the config's shape fields were not used.
    unused = SHAPE_FIELDS if config.init_adapter is not None else set()
    hyperparameters = config.model_dump(mode="json", exclude={"data", "validation", "out", "model", "init_adapter",
                                                              "cache_dir", "resume", *unused})
    lines = [
        "---", f"base_model: {base_model}", "library_name: swapyard",
        f"tags: [swapyard, {config.method}, {config.objective}]", "---", "",
        f"# {config.method} adapter for {Path(base_model).name}", "",
        f"Trained with `swapyard train --method {config.method} --objective {config.objective}` on "
        f"`{config.data.name}` "
        f"({summary['num_train_examples']} examples"
        + (f", validation on `{config.validation.name}` ({summary['num_validation_examples']} examples)"
           if config.validation else "") + ").", "",
        "| result | value |", "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in summary.items()), "",
        "## Hyperparameters", "", "```json", json.dumps(hyperparameters, indent=2), "```", "",
        "Serve it: `POST /v1/adapters` with this folder, then name it as the `model` of a chat request.", "",
    ]
    return "\n".join(lines)
