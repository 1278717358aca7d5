"""Settings of ``opera``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class OPERAConfig(MethodConfig):
    """Settings of ``opera`` (the method and its math: ``halluguard.methods.opera.method``)."""

    name = "opera"
    neutral_overrides = {
        "penalty_weights": 0.0,
        "retrospection": False,
        "image_bonus_tokens": 0,
        "length_normalisation": "transformers",
    }

    num_beams: int = param(5, "beams of the search when the call names none", low=2)
    scale_factor: float = param(50.0, "sigma: scale of attention weights in the column product", low=0.0, low_open=True)
    num_attn_candidates: int = param(
        5, "candidates per beam scored by look-ahead (also the rollback limit per position)", low=1
    )
    penalty_weights: float = param(1.0, "alpha: weight of the over-trust penalty (0 = plain beam search)", low=0.0)
    threshold: int = param(15, "r: rollback when every beam's history holds more than r equal summary positions", low=1)
    retrospection: bool = param(True, "enable the rollback (retrospection-allocation)")
    window_size: int = param(512, "steps of search history kept for rollbacks", low=1)
    image_bonus_tokens: int = param(
        10,
        "official code only: for the first N response tokens reward image attention "
        "instead of penalising (0 = paper behaviour)",
        low=0,
    )
    length_normalisation: str = param(
        "official",
        "how finished beams are ranked: 'official' (transformers 4.29, which the official search runs: "
        "score / (prompt text tokens + one per image + generated) ** length_penalty) or 'transformers' "
        "(the installed release: score / generated ** length_penalty)",
        choices=("official", "transformers"),
    )
    layer: int | None = param(
        None,
        "layer whose head-max attention is read (negative: from the last; default: the last layer that "
        "attends to every token, i.e. not a sliding-window layer)",
        optional=True,
        kind=int,
    )


def capabilities(config: OPERAConfig) -> Capabilities:
    """A beam search of its own: several beams, no sampling, tokens final only at the end."""
    return Capabilities(
        owns_loop=True,
        beams="several",
        beams_reason="a beam search, it does not run with num_beams=1 (the official greedy variant is disabled)",
        sampling="never",
        sampling_reason="a beam search, it refuses sampling (do_sample=True)",
        generation_defaults={"num_beams": config.num_beams},
        late_tokens="its beam search settles the tokens only at the end",
    )


CAPABILITIES = capabilities
