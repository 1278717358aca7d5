"""VTI: visual and textual intervention (Liu et al., ICLR 2025, "Reducing Hallucinations in
Vision-Language Models via Latent Space Steering"; official code shengliu66/VTI).

Directions are computed once per model from demonstrations (``halluguard calibrate vti``; the math
in ``directions``): ``d_l`` per decoder layer from captions with and without hallucinations, and
``e_{l,t}`` per vision encoder layer and token from masked against clean images. At inference every
decoder layer's feed-forward output ``x`` (every position, every step) and every vision encoder
layer's feed-forward output ``x_t`` (every image token) is turned towards its direction, its norm
kept (``vti_utils/llm_layers.py``, ``VTILayer`` after every ``mlp``)::

    x'   = |x|   * normalize(x / |x|     + 0.1 * alpha_text  * d_l / |d_l|)
    x'_t = |x_t| * normalize(x_t / |x_t| + 0.1 * alpha_image * e_{l,t} / |e_{l,t}|)

Official settings (the README's MMHal-Bench command): ``alpha_text = alpha_image = 0.9``, 70
demonstrations (COCO train2014 images with a faithful and a hallucinated caption,
``experiments/data/hallucination_vti_demos.jsonl``), 99% of patches masked, 50 trials, beam search
with 5 beams and 256 new tokens.

Where this follows the code rather than the paper: the direction is the PCA's ``components_ +
mean_`` (the mean difference plus the first principal direction), not the principal direction
alone; the vision PCA runs over the official ``reshape`` of each difference; the last decoder
direction comes from the final-normed hidden state (``hidden_states[-1]``). The vision part needs
an encoder with a fixed number of tokens per image (CLIP and SigLIP towers: LLaVA-1.5, Gemma 3,
PaliGemma); for other families the directions file carries the text part only and ``alpha_image``
must be 0.

VTI steers the model itself: in a composition, a contrast branch is steered as the main stream is,
and every image the guarded call encodes is steered. Cost: per step and layer a norm and a rotation
of the feed-forward output; no extra forward.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ...state import GuardState
from ..base import Method
from .config import CAPABILITIES, VTIConfig

SCALE = 0.1  # the official VTILayer's constant
EPS = 1e-12  # F.normalize's floor on a norm


@dataclasses.dataclass(frozen=True)
class Directions:
    """A model's VTI directions: ``text`` ``(L, d)``; ``vision`` ``(L_v, T, d_v)`` or None; the model
    they were computed for."""

    text: torch.Tensor
    vision: torch.Tensor | None
    model: str


def load_directions(path: str) -> Directions:
    """The directions saved by ``halluguard calibrate vti``."""
    from safetensors import safe_open

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"vti: no directions file at {file} (make one with 'halluguard calibrate vti')")
    with safe_open(str(file), framework="pt") as f:
        names = set(f.keys())
        if "text" not in names:
            raise ValueError(f"vti: {file} holds no text directions; is it a file from 'halluguard calibrate vti'?")
        text = f.get_tensor("text").float()
        vision = f.get_tensor("vision").float() if "vision" in names else None
        model = (f.metadata() or {}).get("model", "")
    return Directions(text, vision, model)


def shifts(directions: torch.Tensor, alpha: float) -> torch.Tensor:
    """``0.1 alpha d / |d|`` for each direction (last dimension)."""
    return SCALE * alpha * F.normalize(directions.float(), dim=-1)


def turn(output: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``|x| normalize(x / |x| + shift)`` over the last dimension (``shift`` from :func:`shifts`,
    broadcasting against ``output``); a zero ``x`` stays zero."""
    x = output.float()
    length = x.norm(dim=-1, keepdim=True)
    turned = x / length.clamp_min(EPS) + shift.to(x.device)
    return (turned * (length / turned.norm(dim=-1, keepdim=True).clamp_min(EPS))).to(output.dtype)


class VTI(Method):
    """Visual and textual intervention (see the module docstring)."""

    config_cls = VTIConfig
    capabilities = CAPABILITIES
    edits_mlp_outputs = True
    edits_vision_mlp_outputs = True

    shift: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (text, vision): 0.1 alpha d / |d|

    def setup(self, adapter: Any) -> None:
        from ...calibrate import made_for

        if self.config.directions is None:
            return  # refused before decoding, with how to make them (Capabilities.required)
        found = load_directions(self.config.directions)
        width = adapter.text_config.hidden_size
        if tuple(found.text.shape) != (adapter.num_layers, width):
            raise ValueError(
                f"vti: the text directions are {tuple(found.text.shape)} (layers, width); this model has "
                f"{adapter.num_layers} layers of width {width}: calibrate for this model"
            )
        if self.config.alpha_image:
            if found.vision is None:
                raise ValueError(
                    "vti: the directions file has no vision part (the model's encoder does not give a fixed number "
                    "of tokens per image, or it was left out): set alpha_image=0"
                )
            if found.vision.shape[0] != len(adapter.vision_mlp_modules()):
                raise ValueError(
                    f"vti: the vision directions cover {found.vision.shape[0]} encoder layers; this model's encoder "
                    f"has {len(adapter.vision_mlp_modules())}: calibrate for this model"
                )
        if found.model and not made_for(found.model, adapter.model):
            import warnings

            warnings.warn(f"vti: the directions were computed for {found.model}, not this model", stacklevel=3)
        device = adapter.model.device  # the shifts live where the model does (moved per call only if sharded)
        vision = found.vision
        self.shift = (
            shifts(found.text, self.config.alpha_text).to(device),
            shifts(vision, self.config.alpha_image).to(device) if vision is not None else None,
        )

    def edit_mlp_output(
        self, state: GuardState, layer_idx: int, mlp_input: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None:
        if not self.config.alpha_text:
            return None
        return turn(output, self._shifts()[0][layer_idx])

    def edit_vision_mlp_output(self, state: GuardState, layer_idx: int, output: torch.Tensor) -> torch.Tensor | None:
        if not self.config.alpha_image:
            return None
        shift = self._shifts()[1][layer_idx]
        if output.shape[-2] != shift.shape[0]:
            raise ValueError(
                f"vti: an image gave {output.shape[-2]} vision tokens; the directions hold {shift.shape[0]} "
                "(another image size than at calibration)"
            )
        return turn(output, shift)

    def _shifts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text and vision shifts (``0.1 alpha`` times each unit direction), made at setup."""
        if self.shift is None:
            raise ValueError(CAPABILITIES.required[0][1])
        return self.shift
