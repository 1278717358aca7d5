"""PAI: paying more attention to image (Liu et al., ECCV 2024).

In layers ``[start_layer, end_layer)``, for the last query row, image-key logits become
``z + alpha * |z|`` before the softmax. Optionally an image-free branch ``u`` guides the scores:
``gamma * (s - u) + u`` on log-probabilities, under the cutoff ``s >= max(s) + ln(beta)``.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class PAIConfig(MethodConfig):
    name = "pai"
    neutral_overrides = {"alpha": 0.0, "use_cfg": False}

    alpha: float = param(0.2, "amplification of image-key logits: z + alpha * |z|", low=0.0)
    start_layer: int = param(2, "first layer amplified", low=0)
    end_layer: int | None = param(None, "layer after the last one amplified; None = all layers", low=1, optional=True, kind=int)
    use_cfg: bool = param(True, "add the image-free guidance branch")
    gamma: float = param(1.1, "guidance strength gamma (README 1.1; CHAIR script 2.0)", low=0.0)
    beta: float = param(0.1, "plausibility cutoff s >= max(s) + ln(beta); 0 disables it", low=0.0, high=1.0)

    def validate(self) -> None:
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(f"PAIConfig.end_layer ({self.end_layer}) must be greater than start_layer ({self.start_layer})")

    def decoding_loop(self) -> str | None:
        return "contrastive branch" if self.use_cfg else None


register_method("pai", PAIConfig, None, "pay more attention to image: boost image logits (+ image-free guidance)")
