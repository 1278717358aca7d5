"""Offline calibration tools (run once per model, results saved and passed to a method's config).

A file that records the model it was made for (a Lookback Lens classifier) is checked against the
model it is used with: ``made_for`` says whether the recorded name is one the model goes by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_names(model: Any) -> set[str]:
    """The names a loaded model goes by: its hub id or folder (``name_or_path``), the folder's own name,
    ``org/name`` of a hub cache folder, and ``testbed`` for the shipped test model."""
    source = str(getattr(model, "name_or_path", "") or "").rstrip("/")
    if not source:
        return set()
    names = {source, Path(source).name}
    for part in Path(source).parts:  # ~/.cache/huggingface/hub/models--org--name/snapshots/<hash>
        if part.startswith("models--") and part.count("--") >= 2:
            names.add(part.removeprefix("models--").replace("--", "/", 1))
    from ..testbed import MODEL_DIR

    if Path(source).expanduser().resolve() == MODEL_DIR.resolve():
        names.add("testbed")
    return names


def made_for(label: str, model: Any) -> bool:
    """Whether a file labelled ``label`` (a hub id, a path or ``testbed``) was made for ``model``; an
    empty label (an older file) or a model without a name cannot be told apart, so it passes."""
    names = model_names(model)
    label = label.strip().rstrip("/")
    return not label or not names or bool({label, Path(label).name} & names)
