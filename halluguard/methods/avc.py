"""AvisC (AVC): attentional vision calibration (Woo et al., ACL Findings 2025).

At prefill the layers holding the top ``layer_gamma`` share of image attention give a per-token
image-attention profile ``g``; "blind" tokens have ``g >= mean(g) + lamb * std(g)``. A contrast
branch sees only the blind tokens (the others' embeddings masked) and the logits are combined as
``(1 + alpha) * l - alpha * l_blind`` under the plausibility cutoff ``l >= max(l) + ln(beta)``.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class AVCConfig(MethodConfig):
    name = "avc"
    neutral_overrides = {"alpha": 0.0, "beta": 0.0}

    layer_gamma: float = param(
        0.5, "cumulative share of image attention that selects the layers", low=0.0, high=1.0, low_open=True
    )
    lamb: float = param(1.0, "blind tokens: g >= mean(g) + lamb * std(g) (scripts 1.0; argparse default 0.99)", low=0.0)
    alpha: float = param(1.0, "contrast strength: (1 + alpha) * l - alpha * l_blind", low=0.0)
    beta: float = param(0.1, "plausibility cutoff l >= max(l) + ln(beta); 0 disables it", low=0.0, high=1.0)
    masking_scheme: str = param(
        "zeros", "how the contrast branch masks non-blind image embeddings", choices=("zeros", "ones", "noise")
    )


register_method("avc", AVCConfig, None, "attentional vision calibration: contrast with blind-token view")
