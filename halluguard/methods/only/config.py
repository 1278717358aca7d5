"""Settings of ``only``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class ONLYConfig(MethodConfig):
    """Settings of ``only`` (the method and its math: ``halluguard.methods.only.method``)."""

    name = "only"
    neutral_overrides = {"alpha_pos": 0.0, "alpha_neg": 0.0}

    layer: int = param(0, "the layer whose attention is intervened on (the official enhance_layer_index 0)", low=0)
    gamma: float = param(
        0.2,
        "total-variation threshold: below it the two distributions agree and are added, above they are contrasted "
        "(the official POPE script 0.2, CHAIR script 0.25, argparse 0.1)",
        low=0.0,
        high=2.0,
    )
    alpha_pos: float = param(3.0, "weight of the intervened logits where they agree: l + a * l_only", low=0.0)
    alpha_neg: float = param(1.0, "weight of the contrast where they differ: (1 + a) l - a l_only", low=0.0)
    beta: float = param(0.1, "plausibility cutoff l >= max(l) + ln(beta); 0 disables it", low=0.0, high=1.0)
    residual_weight: float = param(0.2, "share of the last layer's residual added to the carried output", low=0.0)
    output_weight: float = param(0.5, "share of the model's final hidden state added before the output", low=0.0)
    control: bool = param(False, "the control row: everything but the contrast (the plausibility cutoff alone)")


# the official runs sample (temperature 1, top-p 1, no top-k)
CAPABILITIES = Capabilities(contrasts=True, generation_defaults={"do_sample": True, "top_k": 0})
