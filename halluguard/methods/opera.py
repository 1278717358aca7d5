"""OPERA: over-trust penalty and retrospection-allocation in beam search (Huang et al., CVPR 2024).

For each beam's top ``num_attn_candidates`` tokens, the last layer's head-max attention over the
response window gives the column score ``phi = max_j prod_{i>=j} scale_factor * w_ij``; candidates
are penalised by ``penalty_weights * phi``. When one summary column dominates for ``threshold``
steps the search rolls back to the token after it and forbids the earlier choice.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class OPERAConfig(MethodConfig):
    name = "opera"
    neutral_overrides = {"penalty_weights": 0.0, "retrospection": False, "image_bonus_tokens": 0}

    num_beams: int = param(5, "beams of the search", low=1)
    scale_factor: float = param(50.0, "sigma: scale of attention weights in the column product", low=0.0, low_open=True)
    num_attn_candidates: int = param(
        5, "candidates per beam scored by look-ahead (also the rollback limit per position)", low=1
    )
    penalty_weights: float = param(1.0, "alpha: weight of the over-trust penalty (0 = plain beam search)", low=0.0)
    threshold: int = param(15, "r: rollback when every beam's history holds more than r equal summary positions", low=1)
    retrospection: bool = param(True, "enable the rollback (retrospection-allocation)")
    window_size: int = param(512, "longest response history kept for the penalty", low=1)
    image_bonus_tokens: int = param(
        10,
        "official code only: for the first N response tokens reward image attention "
        "instead of penalising (0 = paper behaviour)",
        low=0,
    )


register_method("opera", OPERAConfig, None, "over-trust penalty and retrospection in beam search")
