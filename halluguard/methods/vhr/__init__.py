"""``vhr``: vision-aware head reinforcement.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, VHRConfig

ENTRY = MethodEntry(
    "vhr", VHRConfig, "halluguard.methods.vhr.method:VHR", "vision-aware head reinforcement", CAPABILITIES
)

__all__ = ["CAPABILITIES", "ENTRY", "VHRConfig"]
