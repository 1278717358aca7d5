"""What moves between transformers releases, in one place.

The rest of the package reaches the transformers internals that have moved, or may move, between
releases only through this module; each entry says which releases it covers.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from packaging.version import Version

VERSION = Version(transformers.__version__)

# ---- the cache argument ----------------------------------------------------------------------------
# 5.24 renamed the cache argument of every model's forward, of ``generate`` and of
# ``prepare_inputs_for_generation``, and the cache field of model and generate outputs, from
# ``past_key_values`` to ``cache`` (the old name is still accepted there, with a warning, until 6.0).
CACHE = "past_key_values" if Version("5.24") > VERSION else "cache"
_CACHE_NAMES = ("cache", "past_key_values")  # either may reach a forward hook or a generate call


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache passed in ``kwargs`` (a forward's or ``generate``'s), under either name; None if none."""
    return next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without a cache argument, under either name."""
    return {k: v for k, v in kwargs.items() if k not in _CACHE_NAMES}


def cache_of(output: Any) -> Any:
    """The cache a model or ``generate`` output carries (None if it carries none)."""
    return getattr(output, CACHE, None)


# ---- generation internals the decoding loops use ---------------------------------------------------
def prefill(model: Any, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> Any:
    """The prompt's forward of a decoding loop that starts from an empty cache (what ``generate``'s
    private ``_prefill`` does then, through the public ``prepare_inputs_for_generation``)."""
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    return model(**inputs, return_dict=True)


def step_inputs(model: Any, input_ids: torch.Tensor, new: int, cache: Any, model_kwargs: dict[str, Any]) -> dict:
    """The model inputs that feed the last ``new`` tokens of ``input_ids`` on ``cache``
    (``prepare_inputs_for_generation``'s ``next_sequence_length``: 5.3 and later)."""
    return model.prepare_inputs_for_generation(
        input_ids, next_sequence_length=new, **{CACHE: cache}, **without_cache(model_kwargs)
    )


def next_generation_kwargs(model: Any, output: Any, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` after a forward, as ``generate`` carries them to the next step: the output's
    cache, one more column of attention mask, token types and positions. ``generate``'s private
    ``_update_model_kwargs_for_generation`` (model classes override it: Qwen's rotary positions,
    Gemma 3's token types), unchanged in name and arguments through 5.x."""
    return model._update_model_kwargs_for_generation(output, model_kwargs)
