"""halluguard: training-free hallucination mitigation for HuggingFace vision-language models.

guard = halluguard.wrap(model, processor, "vhr")    # model.generate is guarded from now on
...
guard.unwrap()                                       # the model is exactly as before

The names below are imported on first use, so ``import halluguard`` (and the console script's
``--help``) does not load torch and transformers until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "Guard": ".api",
    "wrap": ".api",
    "supported_model_types": ".adapters",
    "MethodConfig": ".config",
    "AVCConfig": ".methods",
    "Capabilities": ".methods",
    "DeCoReConfig": ".methods",
    "ICDConfig": ".methods",
    "LookbackConfig": ".methods",
    "M3IDConfig": ".methods",
    "Method": ".methods",
    "OPERAConfig": ".methods",
    "PAIConfig": ".methods",
    "VARConfig": ".methods",
    "VCDConfig": ".methods",
    "VHRConfig": ".methods",
    "ONLYConfig": ".methods",
    "VTIConfig": ".methods",
    "MemVRConfig": ".methods",
    "VISTAConfig": ".methods",
    "get_config": ".registry",
    "list_methods": ".registry",
    "register_method": ".registry",
}

if TYPE_CHECKING:
    from .adapters import supported_model_types
    from .api import Guard, wrap
    from .config import MethodConfig
    from .methods import (
        AVCConfig,
        Capabilities,
        DeCoReConfig,
        ICDConfig,
        LookbackConfig,
        M3IDConfig,
        MemVRConfig,
        Method,
        ONLYConfig,
        OPERAConfig,
        PAIConfig,
        VARConfig,
        VCDConfig,
        VHRConfig,
        VISTAConfig,
        VTIConfig,
    )
    from .registry import get_config, list_methods, register_method


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'halluguard' has no attribute {name!r}")
    importlib.import_module(".attention", __name__)  # registers the "halluguard" attention and mask functions
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AVCConfig",
    "Capabilities",
    "DeCoReConfig",
    "Guard",
    "ICDConfig",
    "LookbackConfig",
    "M3IDConfig",
    "MemVRConfig",
    "Method",
    "MethodConfig",
    "ONLYConfig",
    "OPERAConfig",
    "PAIConfig",
    "VARConfig",
    "VCDConfig",
    "VHRConfig",
    "VISTAConfig",
    "VTIConfig",
    "__version__",
    "get_config",
    "list_methods",
    "register_method",
    "supported_model_types",
    "wrap",
]
