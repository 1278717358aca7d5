"""VCD: visual contrastive decoding (Leng et al., CVPR 2024).

A second branch sees the image with forward-diffusion noise at step ``noise_step``; logits are
``(1 + alpha) * l - alpha * l_noisy`` under the cutoff ``l >= max(l) + ln(beta)``.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class VCDConfig(MethodConfig):
    name = "vcd"
    neutral_overrides = {"alpha": 0.0, "beta": 0.0}

    alpha: float = param(1.0, "contrast strength", low=0.0)
    beta: float = param(0.1, "plausibility cutoff; 0 disables it", low=0.0, high=1.0)
    noise_step: int = param(500, "diffusion step of the image noise (of 1000)", low=0, high=999)


register_method("vcd", VCDConfig, None, "visual contrastive decoding with a noised image")
