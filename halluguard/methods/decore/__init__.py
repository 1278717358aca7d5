"""``decore``: contrast with retrieval heads masked.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, DeCoReConfig

ENTRY = MethodEntry(
    "decore",
    DeCoReConfig,
    "halluguard.methods.decore.method:DeCoRe",
    "contrast with retrieval heads masked",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "DeCoReConfig"]
