"""Lookback Lens: lookback-ratio hallucination detection and guided decoding (Chuang et al., EMNLP 2024).

Per step, layer ``l`` and head ``h``: ``LR = A_ctx / (A_ctx + A_new)`` with ``A_ctx`` the mean
attention on context keys (the prompt) and ``A_new`` the mean on generated keys. A logistic
classifier on span-averaged ``LR`` features detects hallucinated spans; guided decoding samples
``num_candidates`` chunks of ``chunk_size`` tokens and keeps the one the classifier rates most factual.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class LookbackConfig(MethodConfig):
    name = "lookback"
    neutral_overrides = {"mode": "detect"}

    mode: str = param(
        "guide",
        "'detect' (report per-token lookback ratios and scores only) or 'guide' (classifier-guided chunk decoding)",
        choices=("detect", "guide"),
    )
    classifier: str | None = param(
        None, "path of a trained lookback classifier (`halluguard calibrate lookback`)", optional=True, kind=str
    )
    chunk_size: int = param(8, "tokens per candidate chunk", low=1)
    num_candidates: int = param(8, "candidate chunks sampled per step", low=1)
    temperature: float = param(0.9, "sampling temperature of the candidates", low=0.0, low_open=True)
    top_p: float = param(0.95, "nucleus sampling threshold of the candidates", low=0.0, high=1.0, low_open=True)
    context: str = param(
        "prompt",
        "context keys: the whole 'prompt' (image included) or the 'image' tokens only",
        choices=("prompt", "image"),
    )


register_method("lookback", LookbackConfig, None, "lookback-ratio classifier: detection and guided decoding")
