"""Methods: one module per method, each with its config dataclass and one registration."""

from .avc import AVCConfig
from .base import Method
from .decore import DeCoReConfig
from .lookback import LookbackConfig
from .opera import OPERAConfig
from .pai import PAIConfig
from .var import VARConfig
from .vcd import VCDConfig
from .vhr import VHRConfig

__all__ = [
    "AVCConfig",
    "DeCoReConfig",
    "LookbackConfig",
    "Method",
    "OPERAConfig",
    "PAIConfig",
    "VARConfig",
    "VCDConfig",
    "VHRConfig",
]
