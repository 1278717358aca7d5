"""``memvr``: visual retracing, the image re-read as feed-forward memory where a middle layer is unsure.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, MemVRConfig

ENTRY = MethodEntry(
    "memvr",
    MemVRConfig,
    "halluguard.methods.memvr.method:MemVR",
    "re-inject the image tokens as feed-forward memory after the first uncertain middle layer",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "MemVRConfig"]
