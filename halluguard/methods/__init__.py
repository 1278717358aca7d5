"""Methods: one package per method (``vhr``, ``var``, ``pai``, ``vcd``, ``avc``, ``decore``,
``lookback``, ``opera``, ``m3id``, ``icd``, ``vista``, ``memvr``, ``vti``, ``only``), each with its settings
and capabilities (``config``), its entry (``ENTRY``, in the package's ``__init__``) and its
implementation (``method``, and more modules for a method of several parts), imported when the
method is first used. ``BUILTIN`` lists the entries the registry starts with."""

from . import avc, decore, icd, lookback, m3id, memvr, only, opera, pai, var, vcd, vhr, vista, vti
from .avc import AVCConfig
from .base import Method
from .capabilities import Capabilities, MethodEntry
from .decore import DeCoReConfig
from .icd import ICDConfig
from .lookback import LookbackConfig
from .m3id import M3IDConfig
from .memvr import MemVRConfig
from .only import ONLYConfig
from .opera import OPERAConfig
from .pai import PAIConfig
from .var import VARConfig
from .vcd import VCDConfig
from .vhr import VHRConfig
from .vista import VISTAConfig
from .vti import VTIConfig

BUILTIN: tuple[MethodEntry, ...] = tuple(
    m.ENTRY for m in (vhr, var, pai, avc, decore, lookback, opera, vcd, m3id, icd, vista, memvr, vti, only)
)

__all__ = [
    "BUILTIN",
    "AVCConfig",
    "Capabilities",
    "DeCoReConfig",
    "ICDConfig",
    "LookbackConfig",
    "M3IDConfig",
    "MemVRConfig",
    "Method",
    "MethodEntry",
    "ONLYConfig",
    "OPERAConfig",
    "PAIConfig",
    "VARConfig",
    "VCDConfig",
    "VHRConfig",
    "VISTAConfig",
    "VTIConfig",
]
