"""``only``: one layer's text-leaning attention heads, carried to the output, as a contrast.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, ONLYConfig

ENTRY = MethodEntry(
    "only",
    ONLYConfig,
    "halluguard.methods.only.method:ONLY",
    "contrast with one layer's attention, its text-leaning heads and outlier keys dropped, read out at the last layer",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "ONLYConfig"]
