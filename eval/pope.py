"""POPE: polling-based object probing (Li et al., 2023), with the packaged official question files.

Metrics treat "yes" as positive: accuracy, precision, recall, F1 and the yes-ratio, plus the share
of raw answers that start with neither "yes" nor "no". Answer parsing follows one of three rules:

* ``pope`` (default; POPE's and LLaVA's scripts): the text before the first ``.``, commas removed,
  split on spaces; "no" if a word is ``No``, ``not`` or ``no``, otherwise "yes";
* ``opera`` (OPERA/HALC): the whole text without ``.`` and ``,``; "no" if a word is ``No``,
  ``not``, ``no`` or ``NO`` or ends with ``n't``;
* ``vcd`` (VCD and followers): substring tests on the lower-cased text, asymmetric in the label:
  for a "yes" label the answer is yes iff it contains ``yes``; for a "no" label it is no iff it
  contains ``no`` (so "not", "nothing", "know" also count). Without a label: "yes" iff it contains
  ``yes`` and not ``no``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "pope"
DATASETS = ("coco", "aokvqa", "gqa")
SPLITS = ("random", "popular", "adversarial")
RULES = ("pope", "opera", "vcd")


def question_file(dataset: str = "coco", split: str = "random") -> Path:
    if dataset not in DATASETS:
        raise ValueError(f"unknown POPE dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; choose from {', '.join(SPLITS)}")
    name = f"coco_pope_{split}.json" if dataset == "coco" else f"{dataset}_pope_seem_{split}.json"
    return DATA / name


def read_questions(path: str | Path) -> list[dict]:
    """Questions from a JSON-lines file or a JSON array (both layouts are in use)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_questions(dataset: str = "coco", split: str = "random") -> list[dict]:
    """The official questions: ``{"question_id", "image", "text", "label"}`` per row."""
    return read_questions(question_file(dataset, split))


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_answer(text: str, rule: str = "pope", label: str | None = None) -> str:
    """``"yes"`` or ``"no"`` for a model's answer under ``rule`` (see the module docstring)."""
    if rule == "pope":
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if any(w in ("No", "not", "no") for w in words) else "yes"
    if rule == "opera":
        words = text.replace(".", "").replace(",", "").split(" ")
        return "no" if any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words) else "yes"
    if rule == "vcd":
        answer = text.lower().strip()
        if label == "yes":
            return "yes" if "yes" in answer else "no"
        if label == "no":
            return "no" if "no" in answer else "yes"
        return "yes" if "yes" in answer and "no" not in answer else "no"
    raise ValueError(f"unknown answer rule {rule!r}; choose from {', '.join(RULES)}")


def starts_with_yes_or_no(text: str) -> bool:
    head = text.strip().lower()
    return head.startswith("yes") or head.startswith("no")


def metrics(predictions: list[str], labels: list[str], answers: list[str] | None = None) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio (percent), counts, and the share of raw
    ``answers`` (when given) that start with neither yes nor no."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no predictions")
    for value in (*predictions, *labels):
        if value not in ("yes", "no"):
            raise ValueError(f"predictions and labels must be 'yes' or 'no', got {value!r}")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    tn = sum(p == "no" and y == "no" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {
        "accuracy": 100.0 * (tp + tn) / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n,
        "n": n,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }
    if answers is not None:
        out["neither_yes_nor_no"] = 100.0 * sum(not starts_with_yes_or_no(a) for a in answers) / len(answers)
    return out
