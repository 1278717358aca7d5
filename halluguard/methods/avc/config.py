"""Settings of ``avc``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class AVCConfig(MethodConfig):
    """Settings of ``avc`` (AvisC; the method and its math: ``halluguard.methods.avc.method``)."""

    name = "avc"
    neutral_overrides = {"alpha": 0.0, "beta": 0.0}

    layer_gamma: float = param(
        0.5, "cumulative share of image attention that selects the layers", low=0.0, high=1.0, low_open=True
    )
    lamb: float = param(1.0, "blind tokens: g >= mean(g) + lamb * std(g) (scripts 1.0; argparse default 0.99)", low=0.0)
    alpha: float = param(1.0, "contrast strength: (1 + alpha) * l - alpha * l_blind", low=0.0)
    beta: float = param(0.1, "plausibility cutoff l >= max(l) + ln(beta); 0 disables it", low=0.0, high=1.0)
    masking_scheme: str = param(
        "zeros",
        "what replaces the non-blind image embeddings in the contrast branch: 0, 1, or N(0, 1) noise",
        choices=("zeros", "ones", "noise"),
    )
    control: bool = param(
        False, "the control row: everything but the contrast (no branch; the plausibility cutoff alone)"
    )
    separate_stream: bool = param(
        False, "run the contrast branch as its own forward per step (the official way) instead of extra rows"
    )


CAPABILITIES = Capabilities(
    contrasts=True,
    generation_defaults={"do_sample": True, "top_k": 0},  # the official runs sample (temperature 1, top-p 1)
)
