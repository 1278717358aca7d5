"""Settings of ``pai``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class PAIConfig(MethodConfig):
    """Settings of ``pai`` (the method and its math: ``halluguard.methods.pai.method``)."""

    name = "pai"
    neutral_overrides = {"alpha": 0.0, "gamma": 1.0}

    alpha: float = param(0.2, "amplification of image-key logits: z + alpha * |z|", low=0.0)
    start_layer: int = param(2, "first layer amplified", low=0)
    end_layer: int | None = param(
        None, "layer after the last one amplified; None = all layers", low=1, optional=True, kind=int
    )
    use_cfg: bool = param(True, "image-free guidance branch (the paper's method and the official run commands)")
    gamma: float = param(1.1, "guidance strength gamma (README runs 1.1; CHAIR script 2.0; 1 = off)", low=0.0)
    beta: float = param(0.1, "plausibility cutoff s >= max(s) + ln(beta); 0 disables it", low=0.0, high=1.0)
    amplify_first_token: bool = param(
        False, "with guidance on, also amplify the forward that produces the first token (the official code does not)"
    )
    control: bool = param(
        False, "the control row: everything but the image-free contrast (no branch; amplification and the cutoff stay)"
    )
    separate_stream: bool = param(
        False, "run the image-free stream as its own forward per step (the official way) instead of extra rows"
    )

    def validate(self) -> None:
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(
                f"PAIConfig.end_layer ({self.end_layer}) must be greater than start_layer ({self.start_layer})"
            )

    @property
    def guided(self) -> bool:
        """Whether the image-free branch runs (guidance on, and gamma != 1)."""
        return self.use_cfg and self.gamma != 1.0


# amplification acts in other methods' branches; the guidance branch is PAI's own (a logits processor)
CAPABILITIES = Capabilities(acts_in_branches=True)
