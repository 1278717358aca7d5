"""Compare evaluation runs: a markdown table and a bar chart.

``halluguard eval report RUN_DIR ...`` reads each run's ``results.json``. CHAIR runs are compared on
CHAIR_s, CHAIR_i, recall and length; POPE runs on accuracy, F1 and yes-ratio per split. The chart
(``--chart FILE``, PNG) shows CHAIR_s/CHAIR_i or POPE F1/accuracy/yes-ratio per run.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_run(path: str | Path) -> dict:
    folder = Path(path)
    file = folder / "results.json" if folder.is_dir() else folder
    if not file.exists():
        raise FileNotFoundError(f"{file} not found (is {path} a finished run?)")
    return json.loads(file.read_text())


def run_label(result: dict) -> str:
    """``vanilla``, or the methods with the fields that differ from their defaults: ``pai(alpha=0.5)``."""
    from ..registry import get_config

    parts = []
    for config in result.get("methods", []):
        fields = dict(config)
        name = fields.pop("method")
        try:
            defaults = get_config(name).to_dict()
        except ValueError:
            defaults = {}
        changed = [f"{k}={v}" for k, v in fields.items() if defaults.get(k, object()) != v]
        parts.append(f"{name}({', '.join(changed)})" if changed else name)
    return "+".join(parts) or "vanilla"


def chair_table(runs: list[dict]) -> str:
    lines = ["| method | CHAIR_s | CHAIR_i | recall | len | n |", "|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        lines.append(
            f"| {run_label(r)} | {m['chair_s']:.1f} | {m['chair_i']:.1f} | {m['recall']:.1f} | "
            f"{m['len']:.1f} | {m['n']} |"
        )
    return "\n".join(lines)


def pope_table(runs: list[dict]) -> str:
    lines = [
        "| method | split | accuracy | precision | recall | F1 | yes-ratio | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for split, m in r["metrics"].items():
            lines.append(
                f"| {run_label(r)} | {split} | {m['accuracy']:.1f} | {m['precision']:.1f} | {m['recall']:.1f} | "
                f"{m['f1']:.1f} | {m['yes_ratio']:.1f} | {m['n']} |"
            )
    return "\n".join(lines)


def report(paths: list[str], chart: str | None = None) -> str:
    runs = [load_run(p) for p in paths]
    tasks = {r["task"] for r in runs}
    if len(tasks) != 1:
        raise ValueError(f"compare runs of one task at a time, got {sorted(tasks)}")
    task = tasks.pop()
    table = chair_table(runs) if task == "chair" else pope_table(runs)
    if chart:
        save_chart(runs, task, chart)
    return table


def save_chart(runs: list[dict], task: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [run_label(r) for r in runs]
    if task == "chair":
        series = {
            "CHAIR_s": [r["metrics"]["chair_s"] for r in runs],
            "CHAIR_i": [r["metrics"]["chair_i"] for r in runs],
        }
    else:

        def mean(r, key):
            values = [m[key] for m in r["metrics"].values()]
            return sum(values) / len(values)

        series = {
            k: [mean(r, key) for r in runs]
            for k, key in (("F1", "f1"), ("accuracy", "accuracy"), ("yes-ratio", "yes_ratio"))
        }
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(runs) * len(series) / 2, 3.2))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(runs))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_ylabel("%")
    ax.set_title("CHAIR (lower is better)" if task == "chair" else "POPE (mean over splits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
