"""Lookback Lens' classifier: a logistic model over lookback-ratio features, its file and its training.

``p_faithful = sigmoid(w . x + b)`` over a span's mean ratios ``x`` (``L * H`` features, layer-major);
label 1 = faithful, the official convention. The file records the model it was made for, the layout
(layers, heads, context, window) and the metrics of its calibration.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

FORMAT = "halluguard-lookback-classifier/1"


@dataclasses.dataclass
class LookbackClassifier:
    """A logistic classifier over lookback-ratio features: ``p_faithful = sigmoid(w . x + b)``."""

    weights: torch.Tensor  # (num_layers * num_heads,), layer-major
    bias: float
    num_layers: int
    num_heads: int
    context: str = "prompt"
    model: str = ""  # the model it was trained for (a name, for the record)
    window: int = 8  # tokens per example it was trained on
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32).flatten()
        if self.weights.numel() != self.num_layers * self.num_heads:
            raise ValueError(
                f"a lookback classifier for {self.num_layers} layers x {self.num_heads} heads needs "
                f"{self.num_layers * self.num_heads} weights, got {self.weights.numel()}"
            )
        bad = int((~torch.isfinite(self.weights)).sum()) + (not math.isfinite(self.bias))
        if bad:
            raise ValueError(
                f"this lookback classifier holds {bad} weight(s) that are not finite numbers (NaN or inf); "
                "train it again with `halluguard calibrate lookback`"
            )

    def check(self, num_layers: int, num_heads: int, context: str | None = None) -> None:
        """Refuse a model layout (or context choice) other than the one the classifier was trained for."""
        if (num_layers, num_heads) != (self.num_layers, self.num_heads):
            raise ValueError(
                f"this lookback classifier was trained on {self.num_layers} layers x {self.num_heads} heads"
                f"{f' ({self.model})' if self.model else ''}; the model has {num_layers} x {num_heads}"
            )
        if context is not None and context != self.context:
            raise ValueError(f"this lookback classifier was trained with context={self.context!r}, not {context!r}")

    def faithful_probability(self, features: torch.Tensor) -> torch.Tensor:
        """``p_faithful`` for features ``(..., L, H)`` or ``(..., L * H)``."""
        per_head = features.shape[-2:] == (self.num_layers, self.num_heads)
        flat = features.float().flatten(-2) if per_head else features.float()
        return torch.sigmoid(flat @ self.weights.to(flat.device) + self.bias)

    def save(self, path: str | Path) -> None:
        """Write the classifier as JSON (weights, layout, context, model, metrics)."""
        record = {
            "format": FORMAT,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "context": self.context,
            "model": self.model,
            "window": self.window,
            "label": "1 = faithful (not hallucinated)",
            "bias": float(self.bias),
            "weights": [float(w) for w in self.weights],
            "metrics": self.metrics,
        }
        Path(path).write_text(json.dumps(record, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LookbackClassifier:
        """Read a classifier written by ``save`` (JSON only: pickled classifiers are never read)."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read a lookback classifier from {path}: {err}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{path} is not a halluguard lookback classifier (format {FORMAT!r})")
        return cls(
            weights=torch.tensor(record["weights"]),
            bias=float(record["bias"]),
            num_layers=int(record["num_layers"]),
            num_heads=int(record["num_heads"]),
            context=record.get("context", "prompt"),
            model=record.get("model", ""),
            window=int(record.get("window", 8)),
            metrics=dict(record.get("metrics", {})),
        )


def train_classifier(
    features: torch.Tensor, labels: torch.Tensor, num_layers: int, num_heads: int, **fields: Any
) -> LookbackClassifier:
    """Fit the official classifier (scikit-learn ``LogisticRegression(max_iter=1000)``, L2, C = 1) on
    span features ``(N, L * H)`` and labels ``(N,)`` (1 = faithful)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "training a lookback classifier needs scikit-learn: pip install 'halluguard[calibrate]'"
        ) from None
    model = LogisticRegression(max_iter=1000)
    model.fit(features.reshape(len(features), -1).double().numpy(), labels.long().numpy())
    return LookbackClassifier(torch.tensor(model.coef_[0]), float(model.intercept_[0]), num_layers, num_heads, **fields)
