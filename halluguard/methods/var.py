"""VAR: visual attention redistribution from attention sinks (Kang et al., ICLR 2025).

Sink tokens ``S_l = {j : max_{d in D_sink} |x_j[d]| / RMS(x_j) > tau}`` are read from the residual
stream at prefill. For image-centric (head, query) pairs (image mass >= ``summ`` and visual-sink
share of it <= ``rho``) the post-softmax mass on all sinks is scaled by ``p`` and the freed mass
``(1 - p) * M_S`` goes to non-sink image tokens in proportion to their attention.
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig, param
from ..registry import register_method


@dataclasses.dataclass
class VARConfig(MethodConfig):
    name = "var"
    neutral_overrides = {"p": 1.0}

    tau: float = param(20.0, "sink threshold on max |x_d| / RMS(x) over the sink dimensions", low=0.0, low_open=True)
    rho: float = param(0.5, "select (head, query) iff the visual-sink share of the image mass is <= rho", low=0.0, high=1.0)
    summ: float = param(0.2, "select (head, query) iff its attention mass on image tokens is >= summ", low=0.0, high=1.0)
    p: float = param(0.6, "share of the sink mass kept (official code); see p_meaning", low=0.0, high=1.0)
    p_meaning: str = param("kept", "'kept' (official code: p stays on the sinks) or 'moved' (paper Eq. 4: p is moved)",
                           choices=("kept", "moved"))
    first_layer: int = param(2, "first layer where sinks are detected and attention redistributed", low=0)
    skip_last_layer: bool = param(False, "leave the last layer unchanged (the paper's intent; the released code edits it)")
    sink_dims: tuple | None = param(None, "massive-activation dimensions D_sink; None = from the backbone table or "
                                    "`halluguard calibrate sink-dims`", optional=True, kind=tuple)

    def validate(self) -> None:
        if self.sink_dims is not None and any(not isinstance(d, int) or isinstance(d, bool) or d < 0
                                              for d in self.sink_dims):
            raise ValueError(f"VARConfig.sink_dims must be non-negative hidden-dimension indices, got {self.sink_dims!r}")

    @property
    def keep(self) -> float:
        """Share of the sink mass that stays on the sinks."""
        return self.p if self.p_meaning == "kept" else 1.0 - self.p


register_method("var", VARConfig, None, "visual attention sink redistribution")
