"""Settings of ``memvr``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class MemVRConfig(MethodConfig):
    """Settings of ``memvr`` (the method and its math: ``halluguard.methods.memvr.method``)."""

    name = "memvr"
    neutral_overrides = {"retracing_ratio": 0.0}

    retracing_ratio: float = param(
        0.12, "weight of the visual memory in the feed-forward output it enters (the official 0.12)", low=0.0, high=1.0
    )
    entropy_threshold: float = param(
        0.75, "retrace where the logit lens' top-10 entropy (over ln 10) exceeds this", low=0.0, high=1.0
    )
    start_layer: int | None = param(
        None,
        "layers after this one are read (exclusive; None = 5/32 of the depth: LLaVA-1.5-7B's official 5)",
        low=0,
        optional=True,
        kind=int,
    )
    end_layer: int | None = param(
        None,
        "layers before this one are read (exclusive; None = 16/32 of the depth: the official 16)",
        low=1,
        optional=True,
        kind=int,
    )

    def validate(self) -> None:
        if self.start_layer is not None and self.end_layer is not None and self.end_layer <= self.start_layer + 1:
            raise ValueError(
                f"MemVRConfig.end_layer ({self.end_layer}) leaves no layer between it and start_layer "
                f"({self.start_layer})"
            )


# MemVR acts in the main stream only: a contrastive method's branch stays the plain model
CAPABILITIES = Capabilities(generation_defaults={"do_sample": False})
