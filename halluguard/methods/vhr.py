"""VHR: vision-aware head reinforcement (He et al., ACL 2025).

At the first step a text-only stream (image tokens removed) runs in lock-step with the prefill;
per layer ``l`` and head ``i`` the divergence ``VHD = ||A_li(with image) - A_li(without)||_2`` of
the head outputs at the last position selects the heads above the layer median (after an outlier
filter), and those heads' outputs are scaled by ``alpha`` on the chosen layers for the rest of
generation.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class VHRConfig(MethodConfig):
    name = "vhr"
    neutral_overrides = {"alpha": 1.0}

    alpha: float = param(2.0, "scale applied to the selected heads' outputs (1 = no change)", low=0.0, high=10.0, low_open=True)
    layers: tuple | None = param(None, "layer indices to reinforce; None = [1] + the last 14 of 32 layers, "
                                 "scaled to the model's depth (round(14 * L / 32) last layers)", optional=True, kind=tuple)
    include_layer1: bool = param(True, "with the default layers, also reinforce layer 1")
    outlier_filter: bool = param(True, "zero the VHD of heads whose VHD and text-only norm both exceed mean + std")
    fixed_heads: dict | None = param(None, "{layer: [heads]} to reinforce instead of per-input selection", optional=True, kind=dict)

    def validate(self) -> None:
        if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise ValueError(f"VHRConfig.layers must be non-negative layer indices, got {self.layers!r}")


register_method("vhr", VHRConfig, None, "vision-aware head reinforcement: scale vision-sensitive heads")
