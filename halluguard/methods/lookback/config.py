"""Settings of ``lookback``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities

# the official guided decoding's length: 256 new tokens whatever the call asks (32 chunks of 8); here
# the default when a call sets no length
GUIDED_MAX_NEW_TOKENS = 256


@dataclasses.dataclass
class LookbackConfig(MethodConfig):
    """Settings of ``lookback`` (the method and its math: ``halluguard.methods.lookback.method``)."""

    name = "lookback"
    neutral_overrides = {"mode": "detect"}

    mode: str = param(
        "detect",
        "'detect' (per-token lookback ratios and, with a classifier, hallucination scores; tokens unchanged) "
        "or 'guide' (classifier-guided chunk decoding; needs a classifier)",
        choices=("detect", "guide"),
    )
    classifier: str | None = param(None, "path of a trained lookback classifier (JSON)", optional=True, kind=str)
    context: str = param(
        "prompt",
        "context keys: the whole 'prompt' (image included), the 'image' tokens or the prompt's 'text'",
        choices=("prompt", "image", "text"),
    )
    window: int = param(8, "tokens per scored window (the official sliding window)", low=1)
    threshold: float = param(0.5, "flag a token when its window's hallucination probability is above this",
                             low=0.0, high=1.0)  # fmt: skip
    chunk_size: int = param(8, "guided decoding: tokens per candidate chunk", low=1)
    num_candidates: int = param(8, "guided decoding: candidate chunks sampled per step", low=1)
    temperature: float = param(
        1.0,
        "guided decoding: sampling temperature (official code 1; the paper's runs state 0.9)",
        low=0.0,
        low_open=True,
    )
    top_p: float = param(
        1.0, "guided decoding: nucleus threshold (official code 1; the paper's runs state 0.95)", low=0.0, high=1.0,
        low_open=True,
    )  # fmt: skip


def capabilities(config: LookbackConfig) -> Capabilities:
    """Detection reads per-row ratios (no beam search); guided decoding also owns the loop and samples."""
    guide = config.mode == "guide"
    return Capabilities(
        owns_loop=guide,
        beams="one",
        beams_reason="its per-row readings would follow the reordered rows, not the tokens",
        sampling="always" if guide else "any",
        sampling_reason="guided decoding samples its candidates and refuses greedy search",
        generation_defaults=(
            {
                "do_sample": True,
                "temperature": config.temperature,
                "top_p": config.top_p,
                "top_k": 0,
                "max_new_tokens": GUIDED_MAX_NEW_TOKENS,
            }
            if guide
            else {}
        ),
        late_tokens="guided decoding settles a chunk's tokens only once its candidates are scored" if guide else None,
        required=(
            (
                (
                    "classifier",
                    "guided decoding needs a classifier: LookbackConfig(classifier='lb.json'), "
                    "from `halluguard calibrate lookback`",
                ),
            )
            if guide
            else ()
        ),
        needs=("a classifier from `halluguard calibrate lookback` (for scores, and for guided decoding)",),
    )


CAPABILITIES = capabilities
