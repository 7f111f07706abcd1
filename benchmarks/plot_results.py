"""Plot the recorded benchmark results: every docs/benchmarks/results/*.json becomes a PNG of the same name in
docs/benchmarks/img/ (docs/benchmarks.md shows them).

Each results file holds one measurement as it was recorded: its `title`, the `command` that ran it, the `host`
(CPU, ISA, cores, GPU), the `date` and the commit it was `recorded_in`, a one-line `reading`, the `unit`, and the
values: `categories` (the x axis) and `series` (one list of values per bar group, aligned with the categories; a
value is a number, `[low, high]` for a range over runs, or null where nothing was measured). Optional: `log_scale`,
`target` (a dashed line), `higher_is_better`, `extra` and `notes` (not plotted).

    .venv/bin/python benchmarks/plot_results.py [--results DIR] [--out DIR]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks" / "results"
IMAGES = REPO / "docs" / "benchmarks" / "img"
REQUIRED = ("title", "command", "host", "date", "recorded_in", "reading", "unit", "categories", "series")


def load(path: Path) -> dict:
    result = json.loads(path.read_text())
    missing = [key for key in REQUIRED if key not in result]
    if missing:
        raise SystemExit(f"{path}: missing {', '.join(missing)}")
    for name, values in result["series"].items():
        if len(values) != len(result["categories"]):
            raise SystemExit(f"{path}: series {name!r} has {len(values)} values for "
                             f"{len(result['categories'])} categories")
    return result


def host_line(result: dict) -> str:
    host = result["host"]
    parts = [host.get("cpu"), host.get("isa"), f"{host['cores']} cores" if host.get("cores") else None,
             host.get("gpu"), result["date"], result.get("runs")]
    return ", ".join(str(p) for p in parts if p)


def plot(result: dict, out: Path) -> None:
    categories, series = result["categories"], result["series"]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(categories) * max(1, len(series) / 2)), 4.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        shown = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not shown:
            continue
        heights = [(v[0] + v[1]) / 2 if isinstance(v, list) else v for _, v in shown]
        bars = ax.bar([x for x, _ in shown], heights, width, label=name)
        for (x, v), height in zip(shown, heights):
            if isinstance(v, list):  # a range over runs: the bar at its middle, the range as an error bar
                ax.errorbar(x, height, yerr=(v[1] - v[0]) / 2, fmt="none", ecolor="black", capsize=3)
        labels = [f"{v[0]:g}-{v[1]:g}" if isinstance(v, list) else f"{v:g}" for _, v in shown]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    if "target" in result:
        ax.axhline(result["target"], linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"target {result['target']:g}", (-0.45, result["target"]), fontsize=8, ha="left", va="bottom",
                    color="dimgrey", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    if result.get("log_scale"):
        ax.set_yscale("log")
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    better = result.get("higher_is_better")
    ax.set_ylabel(result["unit"] + ("" if better is None else " (higher is better)" if better
                                     else " (lower is better)"), fontsize=8)
    ax.set_title(result["title"], fontsize=10)
    ax.margins(y=0.15)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, f"{host_line(result)}\n{result['command']}", fontsize=6, color="dimgrey", va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot docs/benchmarks/results/*.json into PNGs.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=IMAGES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.results.glob("*.json")):
        out = args.out / f"{path.stem}.png"
        plot(load(path), out)
        print(out)


if __name__ == "__main__":
    main()
