"""``lookback``: lookback-ratio classifier: detection and guided decoding.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, LookbackConfig

ENTRY = MethodEntry(
    "lookback",
    LookbackConfig,
    "halluguard.methods.lookback.method:Lookback",
    "lookback-ratio classifier: detection and guided decoding",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "LookbackConfig"]
