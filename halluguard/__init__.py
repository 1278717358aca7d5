"""halluguard: training-free hallucination mitigation for HuggingFace vision-language models.

guard = halluguard.wrap(model, processor, "vhr")    # model.generate is guarded from now on
...
guard.unwrap()                                       # the model is exactly as before
"""

from . import attention  # noqa: F401  (registers the "halluguard" attention and mask functions)
from ._version import __version__
from .adapters import supported_model_types
from .api import Guard, wrap
from .config import MethodConfig
from .methods import (
    AVCConfig,
    DeCoReConfig,
    LookbackConfig,
    Method,
    OPERAConfig,
    PAIConfig,
    VARConfig,
    VCDConfig,
    VHRConfig,
)
from .registry import get_config, list_methods, register_method

__all__ = [
    "AVCConfig",
    "DeCoReConfig",
    "Guard",
    "LookbackConfig",
    "Method",
    "MethodConfig",
    "OPERAConfig",
    "PAIConfig",
    "VARConfig",
    "VCDConfig",
    "VHRConfig",
    "__version__",
    "get_config",
    "list_methods",
    "register_method",
    "supported_model_types",
    "wrap",
]
