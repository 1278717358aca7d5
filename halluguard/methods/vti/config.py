"""Settings of ``vti``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class VTIConfig(MethodConfig):
    """Settings of ``vti`` (the method and its math: ``halluguard.methods.vti.method``)."""

    name = "vti"
    neutral_overrides = {"alpha_text": 0.0, "alpha_image": 0.0}

    directions: str | None = param(
        None,
        "a file from 'halluguard calibrate vti' (the test model's: testbed/model/vti.safetensors)",
        optional=True,
        kind=str,
    )
    alpha_text: float = param(0.9, "text-decoder steering strength (the README's run 0.9; argparse 0.8)", low=0.0)
    alpha_image: float = param(
        0.9, "vision-encoder steering strength (the README's run 0.9; argparse 0); 0 leaves the encoder alone", low=0.0
    )


CAPABILITIES = Capabilities(
    # VTI steers the model itself: a contrast branch is steered too (both sides differ only in the contrast)
    acts_in_branches=True,
    generation_defaults={"num_beams": 5, "do_sample": False, "max_new_tokens": 256},
    required=(
        (
            "directions",
            "vti needs the model's directions: halluguard calibrate vti --model ID --out vti.safetensors, "
            "then VTIConfig(directions='vti.safetensors')",
        ),
    ),
    needs=("a directions file from 'halluguard calibrate vti' (directions=...)",),
)
