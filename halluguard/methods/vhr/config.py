"""Settings of ``vhr``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass
class VHRConfig(MethodConfig):
    """Settings of ``vhr`` (the method and its math: ``halluguard.methods.vhr.method``)."""

    name = "vhr"
    neutral_overrides = {"alpha": 1.0}

    alpha: float = param(
        2.0, "scale applied to the selected heads' outputs (1 = no change)", low=0.0, high=10.0, low_open=True
    )
    layers: tuple | None = param(
        None,
        "layer indices to reinforce; None = [1] + the last 14 of 32 layers, "
        "scaled to the model's depth (round(14 * L / 32) last layers)",
        optional=True,
        kind=tuple,
    )
    include_layer1: bool = param(True, "with the default layers, also reinforce layer 1")
    outlier_filter: bool = param(True, "zero the VHD of heads whose VHD and text-only norm both exceed mean + std")
    fixed_heads: dict | None = param(
        None, "{layer: [heads]} to reinforce instead of per-input selection", optional=True, kind=dict
    )

    def validate(self) -> None:
        if self.layers is not None and any(not _is_index(i) for i in self.layers):
            raise ValueError(f"VHRConfig.layers must be non-negative layer indices, got {self.layers!r}")
        if self.fixed_heads is not None:
            try:  # JSON turns integer keys into strings; accept both and store integers
                heads = {int(layer): tuple(int(h) for h in hs) for layer, hs in self.fixed_heads.items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"VHRConfig.fixed_heads must map layer indices to lists of head indices, got {self.fixed_heads!r}"
                ) from None
            if any(layer < 0 or any(h < 0 for h in hs) for layer, hs in heads.items()):
                raise ValueError(f"VHRConfig.fixed_heads has negative indices: {self.fixed_heads!r}")
            object.__setattr__(self, "fixed_heads", heads)


CAPABILITIES = Capabilities(acts_in_branches=True, runs_inside={"opera"})
