"""``vti``: visual and textual intervention, steering directions computed offline from demonstrations.

Settings and capabilities in ``config``; the directions' math in ``directions``; the method in
``method``; ``halluguard calibrate vti`` computes a model's directions (``halluguard.calibrate.vti``).
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, VTIConfig

ENTRY = MethodEntry(
    "vti",
    VTIConfig,
    "halluguard.methods.vti.method:VTI",
    "steer the vision encoder and the text decoder along directions computed offline from demonstrations",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "VTIConfig"]
