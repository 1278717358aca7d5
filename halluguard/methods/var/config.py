"""Settings of ``var``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class VARConfig(MethodConfig):
    """Settings of ``var`` (the method and its math: ``halluguard.methods.var.method``)."""

    name = "var"
    neutral_overrides = {"p": 1.0}

    tau: float = param(20.0, "sink threshold on max |x_d| / RMS(x) over the sink dimensions", low=0.0, low_open=True)
    rho: float = param(
        0.5, "select (head, query) iff the visual-sink share of the image mass is <= rho", low=0.0, high=1.0
    )
    summ: float = param(
        0.2, "select (head, query) iff its attention mass on image tokens is >= summ", low=0.0, high=1.0
    )
    p: float = param(0.6, "share of the sink mass kept (official code); see p_meaning", low=0.0, high=1.0)
    p_meaning: str = param(
        "kept",
        "'kept' (official code: p stays on the sinks) or 'moved' (paper Eq. 4: p is moved)",
        choices=("kept", "moved"),
    )
    first_layer: int = param(2, "first layer where sinks are detected and attention redistributed", low=0)
    skip_last_layer: bool = param(
        False, "leave the last layer unchanged (the paper's intent; the released code edits it)"
    )
    sink_dims: tuple | str | None = param(
        None,
        "massive-activation dimensions D_sink, or the file `halluguard calibrate sink-dims --out` writes; "
        "None = from the backbone table",
        optional=True,
        kind=(tuple, str),
    )

    def validate(self) -> None:
        if isinstance(self.sink_dims, tuple) and any(
            not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.sink_dims
        ):
            raise ValueError(
                f"VARConfig.sink_dims must be non-negative hidden-dimension indices, got {self.sink_dims!r}"
            )

    @property
    def keep(self) -> float:
        """Share of the sink mass that stays on the sinks."""
        return self.p if self.p_meaning == "kept" else 1.0 - self.p


CAPABILITIES = Capabilities(
    acts_in_branches=True,
    runs_inside={"opera"},
    needs=("sink dimensions: the backbone table, or a file from `halluguard calibrate sink-dims`",),
)
