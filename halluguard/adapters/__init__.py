"""Adapters by ``config.model_type``: one module per model family."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, mask_to_spans
from .gemma import GemmaAdapter
from .idefics import IdeficsAdapter
from .llava import LlavaAdapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    model_type: cls
    for cls in (LlavaAdapter, QwenVLAdapter, IdeficsAdapter, GemmaAdapter)
    for model_type in cls.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module, processor: Any = None) -> Adapter:
    """The adapter for ``model``, chosen by ``model.config.model_type`` (``processor``, if given,
    names image-delimiter tokens the config does not)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type](model, processor)


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "mask_to_spans", "supported_model_types"]
