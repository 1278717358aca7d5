"""Settings of ``vista``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class VISTAConfig(MethodConfig):
    """Settings of ``vista`` (the method and its math: ``halluguard.methods.vista.method``)."""

    name = "vista"
    neutral_overrides = {"lamda": 0.0, "logits_alpha": 0.0}

    lamda: float = param(
        0.17,
        "steering strength (the official CHAIR run 0.17, its POPE run 0.01; 0: no steering and no extra forward)",
        low=0.0,
    )
    steer_start_layer: int = param(0, "first layer whose feed-forward output is steered", low=0)
    steer_end_layer: int | None = param(
        None,
        "layer after the last one steered; None = all layers (the official default)",
        low=1,
        optional=True,
        kind=int,
    )
    logits_alpha: float = param(
        0.3,
        "weight of the late layers' logits: (1 - a) * logits + a * mean of their logits; 0: off",
        low=0.0,
        high=1.0,
    )
    logits_first_layer: int | None = param(
        None,
        "first layer whose output's logits are mixed in; None = round(25/32 of the depth) (the official 25 of 32)",
        low=0,
        optional=True,
        kind=int,
    )
    logits_last_layer: int | None = param(
        None,
        "last layer (inclusive) whose logits are mixed in; None = round(30/32 of the depth), at most depth - 2",
        low=0,
        optional=True,
        kind=int,
    )

    def validate(self) -> None:
        if self.steer_end_layer is not None and self.steer_end_layer <= self.steer_start_layer:
            raise ValueError(
                f"VISTAConfig.steer_end_layer ({self.steer_end_layer}) must be greater than steer_start_layer "
                f"({self.steer_start_layer})"
            )
        first, last = self.logits_first_layer, self.logits_last_layer
        if first is not None and last is not None and last < first:
            raise ValueError(f"VISTAConfig.logits_last_layer ({last}) must not be below logits_first_layer ({first})")


# VISTA acts in the main stream only: a contrastive method's branch stays the plain model
CAPABILITIES = Capabilities(generation_defaults={"do_sample": False})
