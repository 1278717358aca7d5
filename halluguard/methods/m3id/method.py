"""M3ID: multi-modal mutual-information decoding (Favero et al., CVPR 2024).

With ``l_c`` the log-softmax of the next-token logits given the image and ``l_u`` that of the same
prompt without its image (the image tokens and their delimiters removed), at the ``t``-th generated
token (``t = 1`` for the first, ``first_step`` sets where it starts)::

    gamma_t = exp(-lamda * t),       w_t = (1 - gamma_t) / gamma_t = exp(lamda * t) - 1,
    l_hat   = l_c + w_t * (l_c - l_u)      while max softmax(l_c) < confidence, else l_c,

so the image-free distribution is contrasted away more as the answer grows and the image's pull on
the model fades (``w_1 = 0.02``, ``w_100 = 6.4`` at ``lamda = 0.02``), and only where the
image-conditioned model is unsure. ``l_hat`` differs from ``(1 + w_t) z_c - w_t z_u`` on raw logits by
a constant per row, so sampling and greedy search see the same distribution either way.

No official code was released. This follows the paper's equations (Algorithm 1: ``t`` from 1, the
confidence gate); the re-implementations that report M3ID as a baseline (AvisC's and RITUAL's
samplers) drop the gate and add VCD's plausibility cutoff: ``confidence=1, beta=0.1`` (and RITUAL's
``first_step=0``) reproduce them.

Cost: the image-free branch is prefilled at its own, shorter length and then rides along every main
forward as extra rows (one forward per token); ``separate_stream=True`` runs it as its own forward.
In beam search every beam of a prompt shares ``t`` (the step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...decoding import contrast
from ...decoding.layout import text_only_rows
from ...state import GuardState
from ..contrastive import ContrastMethod, nan_rows_to
from .config import CAPABILITIES, M3IDConfig


def image_weight(lamda: float, t: int) -> float:
    """``w_t = (1 - gamma_t) / gamma_t`` with ``gamma_t = exp(-lamda t)``."""
    return math.expm1(lamda * t)


class M3ID(ContrastMethod):
    """Contrast with the image-free distribution under a growing weight (see the module docstring)."""

    config_cls = M3IDConfig
    capabilities = CAPABILITIES

    def at_neutral_strength(self) -> bool:
        return self.config.lamda == 0

    def branch_prompt(self, state: GuardState, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = state.with_2d_mask(inputs)
        return text_only_rows(inputs, state.adapter.image_and_marker_mask(inputs["input_ids"]))

    def combine(self, state: GuardState, logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        t = state.seen_tokens - state.prompt_len + cfg.first_step
        weight = image_weight(cfg.lamda, t)
        unsure = torch.softmax(logits.float(), -1).amax(-1, keepdim=True) < cfg.confidence
        w = torch.where(unsure, weight, 0.0)
        other = nan_rows_to(other, logits)
        return contrast(logits, other, 1.0 + w, w, space="log_probs", beta=cfg.beta)
