"""``pai``: image-key amplification and image-free guidance.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, PAIConfig

ENTRY = MethodEntry(
    "pai",
    PAIConfig,
    "halluguard.methods.pai.method:PAI",
    "image-key amplification and image-free guidance",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "PAIConfig"]
