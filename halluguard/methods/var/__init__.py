"""``var``: visual attention sink redistribution.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, VARConfig

ENTRY = MethodEntry(
    "var", VARConfig, "halluguard.methods.var.method:VAR", "visual attention sink redistribution", CAPABILITIES
)

__all__ = ["CAPABILITIES", "ENTRY", "VARConfig"]
