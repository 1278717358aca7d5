"""``icd``: instruction contrastive decoding, a contrast with a disturbance instruction before the prompt.

Settings and capabilities in ``config``; the method in ``method``.
"""

from ..capabilities import MethodEntry
from .config import CAPABILITIES, ICDConfig

ENTRY = MethodEntry(
    "icd",
    ICDConfig,
    "halluguard.methods.icd.method:ICD",
    "instruction contrastive decoding: contrast with a disturbance instruction before the prompt",
    CAPABILITIES,
)

__all__ = ["CAPABILITIES", "ENTRY", "ICDConfig"]
