"""Settings of ``vcd``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class VCDConfig(MethodConfig):
    """Settings of ``vcd`` (the method and its math: ``halluguard.methods.vcd.method``)."""

    name = "vcd"
    neutral_overrides = {"alpha": 0.0, "beta": 0.0}

    alpha: float = param(1.0, "contrast strength: (1 + alpha) * l - alpha * l_noised", low=0.0)
    beta: float = param(0.1, "plausibility cutoff l >= max(l) + ln(beta); 0 disables it", low=0.0, high=1.0)
    noise_step: int = param(500, "diffusion step of the image noise (of 1000)", low=0, high=999)
    noise_seed: int = param(
        0, "seed of the noise, mixed with each image's pixels: independent per image, the same in any batch"
    )
    control: bool = param(
        False, "the control row: everything but the contrast (no branch; the plausibility cutoff alone)"
    )
    branch_cache: str = param(
        "own",
        "'own': the noised branch keeps its own cache (the official code since July 2024); 'per_step_copy': "
        "the release the paper's numbers came from (from the second token the contrast is the cutoff alone)",
        choices=("own", "per_step_copy"),
    )
    separate_stream: bool = param(
        False, "run the noised-image branch as its own forward per step (the official way) instead of extra rows"
    )


CAPABILITIES = Capabilities(
    contrasts=True,
    generation_defaults={"do_sample": True, "top_k": 0},  # the official runs sample (temperature 1, top-p 1)
)
