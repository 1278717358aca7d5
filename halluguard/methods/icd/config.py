"""Settings of ``icd``: its config (fields, defaults, ranges) and what it can do."""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, param
from ..capabilities import Capabilities

# the five disturbance prefixes of the official scripts (each run as its own experiment there)
PREFIXES = (
    "You are an object detector to recognize every different objects.",
    "You are an object detector to recognize every different objects by focusing the shapes, colors and "
    "relationships of objects.",
    "I want you avoid any specific identification or categorization of the objects depicted.",
    "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "You are an object detector to provide a general overview or impression of the image.",
)


@dataclasses.dataclass
class ICDConfig(MethodConfig):
    """Settings of ``icd`` (the method and its math: ``halluguard.methods.icd.method``)."""

    name = "icd"
    neutral_overrides = {"alpha": 0.0, "beta": 0.0}

    alpha: float = param(1.0, "contrast strength: (1 + alpha) * l - alpha * l_disturbed", low=0.0)
    beta: float = param(0.1, "plausibility cutoff l >= max(l) + ln(beta); 0 disables it", low=0.0, high=1.0)
    prefix: str = param(PREFIXES[3], "the disturbance instruction put before the prompt of the contrast branch")
    prefix_ids: tuple[int, ...] | None = param(
        None, "the instruction as token ids, used instead of encoding prefix (no processor needed)", kind=tuple
    )
    separate_stream: bool = param(False, "run the disturbed branch as its own forward per step instead of extra rows")
    control: bool = param(
        False, "the control row: everything but the contrast (no branch; the plausibility cutoff alone)"
    )

    def validate(self) -> None:
        if not self.prefix.strip():
            raise ValueError("ICDConfig.prefix is empty: the contrast branch needs a disturbance instruction")
        ids = self.prefix_ids
        if ids is not None and (not ids or not all(type(i) is int and i >= 0 for i in ids)):
            raise ValueError(f"ICDConfig.prefix_ids must be a non-empty list of token ids, got {ids!r}")


CAPABILITIES = Capabilities(
    contrasts=True,
    generation_defaults={"do_sample": True, "top_k": 0},  # the official runs sample (temperature 1, top-p 1)
)
