"""VCD: visual contrastive decoding (Leng et al., CVPR 2024).

A contrast branch sees the same prompt with its image distorted by forward-diffusion noise at step
``t = noise_step`` (500 of 1000 by default, the official code's)::

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,    eps ~ N(0, I),
    abar_t = prod_{s <= t} (1 - beta_s),    beta_s = sigmoid(linspace(-6, 6, 1000))_s * (5e-3 - 1e-5) + 1e-5,

on the processor's normalised pixel tensor (as the official code adds it after CLIP's
normalisation; ``abar_500 = 0.745``). With ``l`` and ``l'`` the next-token logits of the image and of
the noised image, the logits become

    (1 + alpha) * l - alpha * l',   with tokens where l < max(l) + ln(beta) set to -inf,

before ``generate``'s processors and warpers (the official sampler's order). The official runs
sample (temperature 1, no top-k, top-p 1): a guarded ``generate`` given none of ``do_sample`` and
``top_k`` (nor a generation config) samples that way; ``do_sample=False`` decodes greedily, and
beam search works too (with the default cache).

Where the official code and ours differ: the official noise is drawn from torch's global generator
at every question, so it differs per image (and per question of the same image) and repeats only
with the run's seed and order; here each image's noise comes
from a generator seeded with ``noise_seed`` and a hash of the image's first tile
(:func:`image_seed`), so different images get independent noise and an image gets the same noise
alone or in any batch. The
official code runs the branch as a second forward per step; here it rides along as extra rows of
the main forward (``separate_stream=True``: the official way, same results).

Which official code: the repository's current sampler (since commit c637c85, July 2024) keeps the
noised branch's own cache from step to step, and so does ours (``branch_cache="own"``). The
release the paper's numbers came from copied the clean branch's arguments, cache included, into the
noised branch at every step, so from the second token the noised branch saw the clean cache and
``l' = l``: the contrast reduced to ``l`` under the plausibility cutoff. ``branch_cache=
"per_step_copy"`` reproduces that (the first token contrasted, every later one the cutoff alone; the
branch rows still run).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ...state import GuardState
from ..contrastive import ContrastMethod, same_prompt
from .config import CAPABILITIES, VCDConfig

NUM_STEPS = 1000


def noise_level(step: int) -> float:
    """``abar_step`` of the official sigmoid schedule (``step`` in ``[0, 1000)``)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[step])


def image_seed(seed: int, image: torch.Tensor) -> int:
    """The seed of one image's noise (63 bits): ``seed`` hashed with the image's first tile, the
    first entry along every leading dimension down to (channels, height, width) (LLaVA-NeXT's base
    tile, the first image of an Idefics row, a plain image itself; Qwen's patch rows whole). Padding
    tiles or images, which follow, do not change it."""
    head = image
    while head.dim() > 3:
        head = head[0]
    head = head.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + head).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def add_diffusion_noise(pixels: torch.Tensor, step: int, images: list[slice], seed: int) -> torch.Tensor:
    """``pixels`` with the forward-diffusion noise of ``step``; each image slice of the first dimension
    draws its noise from its own generator, seeded by :func:`image_seed`."""
    abar = noise_level(step)
    noised = pixels.float().clone()
    for part in images or [slice(None)]:
        gen = torch.Generator(device="cpu").manual_seed(image_seed(seed, pixels[part]))
        eps = torch.randn(noised[part].shape, generator=gen, dtype=torch.float32).to(noised.device)
        noised[part] = abar**0.5 * noised[part] + (1 - abar) ** 0.5 * eps
    return noised.to(pixels.dtype)


class VCD(ContrastMethod):
    """Visual contrastive decoding (see the module docstring)."""

    config_cls = VCDConfig
    capabilities = CAPABILITIES

    def combine(self, state: GuardState, logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.config.branch_cache == "per_step_copy" and not state.in_prefill:
            return self.control_logits(logits)  # the release's noised branch ran on the clean cache: l' = l
        return super().combine(state, logits, other)

    def branch_prompt(self, state: GuardState, inputs: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        prompt = same_prompt(state, inputs)
        # generate encodes the caller's images before the first forward (mm_encoder_outputs); the
        # branch gets the encoding of the noised images instead
        images = dict(state.call_inputs) if "mm_encoder_outputs" in prompt else prompt
        pixels = images.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            raise ValueError("VCD noises the prompt's image: the call has no pixel_values")
        noised = add_diffusion_noise(pixels, cfg.noise_step, state.adapter.image_slices(images), cfg.noise_seed)
        if "mm_encoder_outputs" in prompt:
            images["pixel_values"] = noised
            ids = state.call_inputs.get("input_ids", prompt["input_ids"])
            prompt["mm_encoder_outputs"] = state.adapter.encode_images(images, ids, prompt["input_ids"].shape[0])
        else:
            prompt["pixel_values"] = noised
        return prompt
