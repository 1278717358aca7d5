"""What moves between transformers releases, in one place.

halluguard supports transformers from pyproject.toml's floor (``floor()``) up to the newest release:
CI runs the test suite on both, and ``NEWEST_TESTED`` records the newest it passed on. The rest of
the package reaches the transformers internals that have moved, or may move, between releases only
through this module, each entry saying which releases it covers:

* the cache argument's name (``CACHE``: 5.24 renamed ``past_key_values`` to ``cache``);
* the generation internals the decoding loops use: the prompt's forward, a step's inputs, the
  arguments ``generate`` carries to the next step, image encoder outputs repeated for beams;
* the cache's layers: rows, row selection, rows padded in, OPERA's crops and slot gathers;
* a config's attention implementation;
* loading a processor whose video part needs torchvision when torchvision is missing
  (``load_processor``).

The private names still used are all here: ``_update_model_kwargs_for_generation`` and
``_expand_multimodal_outputs`` (model classes override them; owning them would copy model code),
``_attn_implementation`` (no public reader), and the cache layers' ``keys``, ``values`` and
``cumulative_length`` (what OPERA's look-ahead and rollback edit in place). Used elsewhere, public
or unchanged through the supported releases: ``AttentionInterface`` and ``AttentionMaskInterface``
with ``masking_utils.sdpa_mask``, ``integrations.sdpa_attention.sdpa_attention_forward`` and each
model module's ``eager_attention_forward`` (the attention hook); ``DynamicCache`` and its row
operations; ``generate(custom_generate=...)`` and ``prepare_inputs_for_generation``;
``GenerateDecoderOnlyOutput``, ``GenerateBeamDecoderOnlyOutput`` and ``LogitsProcessor``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from typing import Any

import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

VERSION = Version(transformers.__version__)
# The newest release the whole test suite passed on; the oldest is pyproject.toml's requirement
# (``floor()``), and CI runs the suite on both.
NEWEST_TESTED = Version("5.25.0")


def floor() -> Version | None:
    """The oldest transformers release halluguard supports, from its installed metadata (pyproject's
    ``transformers>=...``); None when the package metadata is not installed."""
    try:
        requirements = importlib.metadata.requires("halluguard") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name == "transformers" and not requirement.marker:
            bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
            return max(bounds, default=None)
    return None


def tested_range() -> str:
    """The releases the test suite runs on, for messages: ``"5.18.0 to 5.25.0"``."""
    oldest = floor()
    return f"{oldest} to {NEWEST_TESTED}" if oldest is not None else f"up to {NEWEST_TESTED}"


@functools.cache
def warn_if_untested() -> None:
    """Warn once per process when the installed transformers is a newer minor release than the newest
    one tested (a patch release of a tested one is not warned about)."""
    if VERSION.release[:2] > NEWEST_TESTED.release[:2]:
        warnings.warn(
            f"transformers {VERSION} is newer than the releases halluguard was tested on ({tested_range()}); "
            "`halluguard doctor` checks the guard's identities and the methods' effects on it (about 30 s on a CPU)",
            UserWarning,
            stacklevel=3,
        )


# ---- the cache argument ----------------------------------------------------------------------------
# 5.24 renamed the cache argument of every model's forward, of ``generate`` and of
# ``prepare_inputs_for_generation``, and the cache field of model and generate outputs, from
# ``past_key_values`` to ``cache`` (the old name is still accepted there, with a warning, until 6.0).
CACHE = "cache" if VERSION.release[:2] >= (5, 24) else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")  # either may reach a forward hook or a generate call


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache passed in ``kwargs`` (a forward's or ``generate``'s), under either name; None if none.
    A cache under a name this module does not know (a release that renames it again) is an error, not
    a call read as cacheless."""
    found = next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)
    stray = next((k for k, v in kwargs.items() if isinstance(v, transformers.Cache) and k not in _CACHE_NAMES), None)
    if found is None and stray is not None:
        raise RuntimeError(
            f"transformers {VERSION} passes the cache as {stray!r}, which this halluguard does not know "
            f"(tested: {tested_range()}): install a tested transformers release or a newer halluguard"
        )
    return found


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


def expand_multimodal_outputs(model: Any, input_ids: torch.Tensor, outputs: dict, expand: int) -> dict:
    """Encoder outputs (``mm_encoder_outputs``: what ``generate`` has computed from the image inputs
    since 5.18, the floor) repeated for ``expand`` rows per prompt, as ``generate`` repeats them for
    beams or several sequences (its private ``_expand_multimodal_outputs``, 5.18 and later)."""
    return model._expand_multimodal_outputs(input_ids, outputs, expand_size=expand, inputs_embeds=None)


def text_attn_implementation(text_config: Any) -> str | None:
    """The attention implementation a (text) config selects: its private ``_attn_implementation``,
    unchanged through 5.x (``set_attn_implementation`` is the public way to change it)."""
    return text_config._attn_implementation


def next_generation_kwargs(model: Any, output: Any, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` after a forward, as ``generate`` carries them to the next step: the output's
    cache, one more column of attention mask, token types and positions. ``generate``'s private
    ``_update_model_kwargs_for_generation`` (model classes override it: Qwen's rotary positions,
    Gemma 3's token types), unchanged in name and arguments through 5.x."""
    return model._update_model_kwargs_for_generation(output, model_kwargs)


# ---- cache layers --------------------------------------------------------------------------------------
# A ``DynamicCache`` holds one layer object per decoder layer (``cache.layers``) with ``keys`` and
# ``values`` tensors ``(rows, kv heads, tokens, head dim)``; a sliding-window layer also counts every
# token it has seen (``cumulative_length``). The row operations ``generate`` applies to a cache
# (``reorder_cache`` for beam search, ``batch_repeat_interleave`` and ``batch_select_indices`` for
# expanded rows; ``halluguard.decoding.cache.RowGroupsCache`` extends them to its row blocks) keep
# these names from 5.0 through 5.25. ``activate_past_recording`` (5.14 and later) makes a
# sliding-window layer keep every state; up to 5.17 such a layer then also returned every state to
# attention (5.18 returns the window), so OPERA's look-ahead masks need 5.18.
def filled_layers(cache: Any) -> list[Any]:
    """The layers of ``cache`` that hold keys."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]


def cache_rows(cache: Any) -> int:
    """The batch rows a cache holds (0 while empty)."""
    layers = filled_layers(cache)
    return layers[0].keys.shape[0] if layers else 0


def cache_device(cache: Any) -> torch.device:
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return layers[0].keys.device if layers else torch.device("cpu")


def select_cache_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep rows ``rows`` of every layer, in that order (``DynamicCache``'s own selection, whatever
    a subclass makes of it)."""
    transformers.DynamicCache.batch_select_indices(cache, rows.to(cache_device(cache)))


def append_rows(cache: Any, other: Any) -> None:
    """Append ``other``'s rows to ``cache``'s, left-padded with zeros to ``cache``'s length."""
    if len(other.layers) != len(cache.layers):
        raise ValueError("a stream's cache must have as many layers as the main cache")
    for mine, theirs in zip(cache.layers, other.layers):
        pad = mine.keys.shape[-2] - theirs.keys.shape[-2]
        if pad < 0:
            raise ValueError("a branch stream's prompt cannot be longer than the main prompt")
        keys = torch.nn.functional.pad(theirs.keys, (0, 0, pad, 0)).to(mine.keys.dtype)
        values = torch.nn.functional.pad(theirs.values, (0, 0, pad, 0)).to(mine.values.dtype)
        mine.keys = torch.cat([mine.keys, keys])
        mine.values = torch.cat([mine.values, values])


def record_past(cache: Any) -> None:
    """Make sliding-window layers keep every state, so that ``crop_cache`` can go back beyond the window."""
    cache.activate_past_recording()


def keep_slots(cache: Any, rows: torch.Tensor, last: torch.Tensor, added: int) -> None:
    """After a forward that added ``added`` tokens side by side to every row: row ``i`` becomes old row
    ``rows[i]`` with the earlier tokens and, of the added ones, only slot ``last[i]`` (OPERA's
    look-ahead: the winning candidate's slot)."""
    for layer in filled_layers(cache):
        kept = layer.keys.shape[-2] - added
        device = layer.keys.device
        slots = torch.cat([torch.arange(kept, device=device).expand(len(rows), -1), kept + last.to(device)[:, None]], 1)
        index = rows.to(device)[:, None]
        layer.keys = layer.keys[index, :, slots].transpose(1, 2)
        layer.values = layer.values[index, :, slots].transpose(1, 2)
        if hasattr(layer, "cumulative_length"):  # a sliding-window layer counts the tokens it saw
            layer.cumulative_length -= added - 1


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` tokens of every layer. A sliding-window layer that records its past
    (``record_past``) is cut without being narrowed back to its window, so a later crop can go back
    further than the tokens added since this one."""
    for layer in filled_layers(cache):
        keys = layer.keys
        seen = getattr(layer, "cumulative_length", keys.shape[-2])
        remove = seen - length
        if remove > keys.shape[-2]:
            raise RuntimeError(f"the cache no longer holds the {remove} tokens a crop removes")
        if remove > 0:
            end = keys.shape[-2] - remove
            layer.keys, layer.values = keys[..., :end, :], layer.values[..., :end, :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = length


def drop_leading_tokens(cache: Any, count: int) -> None:
    """Remove the first ``count`` tokens of every layer (those a sliding-window layer already let go
    of are gone), as if they had never been fed."""
    for layer in filled_layers(cache):
        seen = getattr(layer, "cumulative_length", layer.keys.shape[-2])
        held = count - (seen - layer.keys.shape[-2])  # of the first count tokens, those still held
        if held > 0:
            layer.keys, layer.values = layer.keys[..., held:, :], layer.values[..., held:, :]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length -= count


def load_processor(spec: str) -> Any:
    """``AutoProcessor.from_pretrained(spec)``, or, where that fails because the processor's video
    part needs torchvision and torchvision is not installed, the same processor class loaded with
    transformers' ``BaseVideoProcessor`` in place of its video processor (a warning says so).

    Every video processor class, and transformers' own check of a processor's parts against
    ``VideoProcessorMixin``, need torchvision (through 5.25), so Qwen2/2.5/3-VL, SmolVLM and
    LLaVA-OneVision processors cannot be built without it although their image path needs none. The
    fallback builds a subclass of the real processor class (same name, same methods) whose only
    difference is that it accepts the stand-in video part, from the folder's image processor,
    tokenizer and processor settings (chat template included); images run as usual, and only a
    video input fails."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(spec)
    except Exception as err:
        processor_class = None if is_torchvision_available() else _video_processor_class(spec)
        if processor_class is None:
            raise
        failure = err
    try:
        processor = _load_without_video(processor_class, spec)
    except Exception:
        raise failure from None  # the fallback failed as well: report why the plain load failed
    warnings.warn(
        f"torchvision is not installed: {processor_class.__name__} is loaded without its video processor "
        "(images are processed as usual; videos need torchvision)",
        stacklevel=3,
    )
    return processor


def _load_without_video(processor_class: type, spec: str) -> Any:
    """``processor_class`` from ``spec``'s image processor, tokenizer and processor settings, with a
    ``BaseVideoProcessor`` as its video part. 5.2x builds a processor from keyword parts
    (``from_dict``); 5.18 from positional parts (``from_args_and_dict``, deprecated later)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.video_processing_utils import BaseVideoProcessor

    image_only = without_video(processor_class)
    settings, _ = image_only.get_processor_dict(spec)
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(spec),
        "tokenizer": AutoTokenizer.from_pretrained(spec),
        "video_processor": BaseVideoProcessor(),
    }
    if hasattr(image_only, "from_dict"):
        return image_only.from_dict({**settings, **parts})
    return image_only.from_args_and_dict([parts[name] for name in image_only.get_attributes()], settings)


def without_video(processor_class: type) -> type:
    """A subclass of ``processor_class`` (same name) that takes transformers' ``BaseVideoProcessor``
    as its video part, so it can be built without torchvision (see :func:`load_processor`)."""
    from transformers.video_processing_utils import BaseVideoProcessor

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, BaseVideoProcessor):
            return BaseVideoProcessor
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_class.__name__,
        (processor_class,),
        {"check_argument_for_proper_class": check_argument_for_proper_class},
    )


def _video_processor_class(spec: str) -> Any:
    """The processor class of ``spec``'s model type, if its parts are an image processor, a tokenizer
    and a video processor; else ``None``."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(spec).model_type
    except Exception:
        return None
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
    attributes = set(processor_class.get_attributes()) if isinstance(processor_class, type) else set()
    return processor_class if attributes == {"image_processor", "tokenizer", "video_processor"} else None
