"""Compare evaluation runs: a markdown table and a bar chart.

``halluguard eval report RUN_DIR ...`` reads each run's ``results.json``. Every table row names the
model, the data (dataset and split) and the methods; CHAIR runs are compared on CHAIR_s, CHAIR_i,
recall and length, POPE runs on accuracy, precision, recall, F1 and yes-ratio per split, and a run
with failed rows says how many in its ``n``. The chart (``--chart FILE``, PNG) shows CHAIR_s/CHAIR_i
or POPE F1/accuracy/yes-ratio per run, with the legend beside the axes.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_run(path: str | Path) -> dict:
    """A run's results; ``ValueError`` (with the path) when it is missing, unfinished or unreadable."""
    folder = Path(path)
    file = folder / "results.json" if folder.is_dir() else folder
    if not folder.exists():
        raise ValueError(f"{path}: no such run folder or file")
    if not file.exists():
        raise ValueError(f"{path}: no results.json (an unfinished run, or not a run folder)")
    try:
        result = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not a results file ({err})") from None
    if not isinstance(result, dict) or result.get("task") not in ("chair", "pope"):
        raise ValueError(f"{file}: not a CHAIR or POPE results file")
    if not result.get("metrics"):
        raise ValueError(f"{file}: the run has no scores")
    return result


def model_label(result: dict) -> str:
    """The model's short name: ``testbed``, a hub id, or a local folder's name."""
    name = str(result.get("model", "?"))
    return name if name == "testbed" or (name.count("/") == 1 and not Path(name).exists()) else Path(name).name


def data_label(result: dict) -> str:
    """``testbed misleading``, ``coco val2014``, ``aokvqa``..."""
    if result["task"] == "chair":
        return f"{result.get('dataset', '?')} {result.get('split', '')}".strip()
    return str(result.get("dataset", "?"))


def incomplete_note(result: dict) -> str:
    failed = result.get("failed", {}).get("count", 0)
    return f" ({failed} failed)" if failed else ""


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
    """CHAIR rows; a ``partner`` column (the testbed's anchor-partner rate) when some run has one."""
    partner = any("partner_named" in r["metrics"] for r in runs)
    head = "| model | data | method | CHAIR_s | CHAIR_i | recall |" + (" partner |" if partner else "") + " len | n |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in runs:
        m = r["metrics"]
        named = (f" {m['partner_named']:.1f} |" if "partner_named" in m else " - |") if partner else ""
        lines.append(
            f"| {model_label(r)} | {data_label(r)} | {run_label(r)} | {m['chair_s']:.1f} | {m['chair_i']:.1f} | "
            f"{m['recall']:.1f} |{named} {m['len']:.1f} | {m['n']}{incomplete_note(r)} |"
        )
    return "\n".join(lines)


def pope_table(runs: list[dict]) -> str:
    lines = [
        "| model | data | method | split | accuracy | precision | recall | F1 | yes-ratio | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for split, m in r["metrics"].items():
            lines.append(
                f"| {model_label(r)} | {data_label(r)} | {run_label(r)} | {split} | {m['accuracy']:.1f} | "
                f"{m['precision']:.1f} | {m['recall']:.1f} | {m['f1']:.1f} | {m['yes_ratio']:.1f} | {m['n']} |"
            )
    return "\n".join(lines)


TABLES = {"chair": chair_table, "pope": pope_table}  # a run's task -> the table of its results


def report(paths: list[str], chart: str | None = None) -> str:
    runs = [load_run(p) for p in paths]
    tasks = {r["task"] for r in runs}
    if not runs:
        raise ValueError("no runs to report")
    if len(tasks) != 1:
        raise ValueError(f"compare runs of one task at a time, got {sorted(tasks)}")
    task = tasks.pop()
    table = TABLES[task](runs)
    if chart:
        save_chart(runs, task, chart)
    return table


def build_chart(runs: list[dict], task: str):
    """A bar chart (matplotlib figure) of the runs; the legend sits right of the axes, off the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, datas = sorted({model_label(r) for r in runs}), sorted({data_label(r) for r in runs})
    labels = [
        "\n".join([run_label(r)] + [f(r) for f, seen in ((model_label, models), (data_label, datas)) if len(seen) > 1])
        for r in runs
    ]
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
    lines = max(label.count("\n") for label in labels) + 1
    fig, ax = plt.subplots(figsize=(2.6 + (0.6 + 0.4 * lines) * len(runs) * len(series) / 2, 3.0 + 0.25 * lines))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(runs))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    top = max(max(v) for v in series.values())
    ax.set_ylim(0, max(top * 1.15, 1.0))  # room for the value labels
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    ax.set_ylabel("%")
    title = "CHAIR (lower is better)" if task == "chair" else "POPE (mean over splits)"
    shared = [names[0] for names in (models, datas) if len(names) == 1]
    ax.set_title(f"{title}: {', '.join(shared)}" if shared else title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def save_chart(runs: list[dict], task: str, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = build_chart(runs, task)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
