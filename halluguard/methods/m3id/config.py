"""Settings of ``m3id``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities


@dataclasses.dataclass
class M3IDConfig(MethodConfig):
    """Settings of ``m3id`` (the method and its math: ``halluguard.methods.m3id.method``)."""

    name = "m3id"
    neutral_overrides = {"lamda": 0.0, "beta": 0.0}

    lamda: float = param(
        0.02, "decay of the image's influence: gamma_t = exp(-lamda * t), weight (1 - gamma_t) / gamma_t", low=0.0
    )
    confidence: float = param(
        0.3,
        "the correction applies while the image-conditioned top-1 probability is below this (1: always, as "
        "the AvisC and RITUAL re-implementations run it)",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    beta: float = param(
        0.0,
        "plausibility cutoff l >= max(l) + ln(beta) (the paper has none; 0.1 in the AvisC and RITUAL "
        "re-implementations)",
        low=0.0,
        high=1.0,
    )
    first_step: int = param(1, "t of the first generated token (Algorithm 1: 1; RITUAL's re-implementation: 0)", low=0)
    control: bool = param(
        False, "the control row: everything but the contrast (no branch; the plausibility cutoff alone)"
    )
    separate_stream: bool = param(False, "run the image-free branch as its own forward per step instead of extra rows")


CAPABILITIES = Capabilities(contrasts=True)
