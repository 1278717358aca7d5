"""``m3id``: contrast with the image-free distribution, weighted up as the answer grows.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, M3IDConfig

ENTRY = MethodEntry(
    "m3id",
    M3IDConfig,
    "halluguard.methods.m3id.method:M3ID",
    "contrast with the image-free distribution, weighted up as the image's influence fades",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "M3IDConfig"]
