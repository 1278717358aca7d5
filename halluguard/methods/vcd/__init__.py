"""``vcd``: visual contrastive decoding with a noised image.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, VCDConfig

ENTRY = MethodEntry(
    "vcd",
    VCDConfig,
    "halluguard.methods.vcd.method:VCD",
    "visual contrastive decoding with a noised image",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "VCDConfig"]
