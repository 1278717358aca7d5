"""``opera``: over-trust penalty and retrospection in beam search.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, OPERAConfig

ENTRY = MethodEntry(
    "opera",
    OPERAConfig,
    "halluguard.methods.opera.method:OPERA",
    "over-trust penalty and retrospection in beam search",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "OPERAConfig"]
