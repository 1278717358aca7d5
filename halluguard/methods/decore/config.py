"""Settings of ``decore``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class DeCoReConfig(MethodConfig):
    """Settings of ``decore`` (the method and its math: ``halluguard.methods.decore.method``)."""

    name = "decore"
    neutral_overrides = {"alpha_mode": "static", "alpha": 0.0}

    retrieval_heads: str | None = param(
        None,
        "JSON of retrieval heads ({'layer-head': [scores]}, the official format; "
        "`halluguard calibrate retrieval-heads` makes one), or that object itself",
        optional=True,
        kind=(str, dict),
    )
    num_retrieval_heads: int = param(50, "K: the top-K retrieval heads by mean score are masked (0: none)", low=0)
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
    masked_prefill: bool = param(
        False, "mask the heads over the whole prompt too (the official code shares the unmasked prompt cache)"
    )
    control: bool = param(False, "the control row: everything but the contrast (no branch; the base log-probabilities)")
    separate_stream: bool = param(
        False, "run the masked branch as its own forward per step (the official way) instead of extra rows"
    )


CAPABILITIES = Capabilities(
    contrasts=True, needs=("retrieval heads: a file from `halluguard calibrate retrieval-heads`",)
)
