"""Methods: every method's settings and registration in ``configs``; one implementation module per
method (``vhr``, ``var``, ``pai``), imported when the method is first used."""

from .base import Method
from .configs import (
    AVCConfig,
    DeCoReConfig,
    LookbackConfig,
    OPERAConfig,
    PAIConfig,
    VARConfig,
    VCDConfig,
    VHRConfig,
)

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
