"""``vista``: a visual steering vector in every feed-forward output, and self-logits augmentation.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, VISTAConfig

ENTRY = MethodEntry(
    "vista",
    VISTAConfig,
    "halluguard.methods.vista.method:VISTA",
    "steer every layer towards the image (the residual difference with and without it) and mix in late layers' logits",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "VISTAConfig"]
