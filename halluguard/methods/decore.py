"""DeCoRe: decoding by contrasting retrieval heads (Gema et al., 2024).

A second branch runs with the retrieval heads masked; the next-token scores are
``(1 + a_t) * log p_base - a_t * log p_masked`` with ``a_t`` the entropy of ``p_base`` (or a
constant), decoded greedily.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class DeCoReConfig(MethodConfig):
    name = "decore"
    neutral_overrides = {"alpha_mode": "static", "alpha": 0.0}

    retrieval_heads: str | None = param(
        None,
        "JSON of retrieval heads ({'layer-head': scores}); `halluguard calibrate retrieval-heads` makes one",
        optional=True,
        kind=str,
    )
    num_retrieval_heads: int = param(50, "K: the top-K retrieval heads are masked", low=1)
    alpha_mode: str = param(
        "entropy", "'entropy' (a_t = entropy of the base distribution) or 'static'", choices=("entropy", "static")
    )
    alpha: float = param(0.5, "a_t when alpha_mode is 'static'", low=0.0)
    alpha_cap: float | None = param(None, "upper bound on a_t", low=0.0, optional=True)
    scale_alpha: bool = param(False, "divide the entropy by ln |V|")
    masking: str = param(
        "uniform",
        "'uniform' (official code: zero query, head output = mean of V) or 'zero_output' (paper: head output set to 0)",
        choices=("uniform", "zero_output"),
    )


register_method("decore", DeCoReConfig, None, "contrast with retrieval heads masked")
