"""``avc``: attentional vision calibration: contrast with blind-token view.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, AVCConfig

ENTRY = MethodEntry(
    "avc",
    AVCConfig,
    "halluguard.methods.avc.method:AVC",
    "attentional vision calibration: contrast with blind-token view",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "AVCConfig"]
