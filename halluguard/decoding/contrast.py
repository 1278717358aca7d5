"""The contrast of two next-token score vectors, shared by every contrastive and guidance method.

For main scores ``a`` and the other stream's scores ``b`` (one row per sequence):

    out = w_a * f(a) - w_b * f(b),      f = log_softmax  (``space="log_probs"``)
                                           or identity    (``space="logits"``),

then tokens with ``f(a) < max f(a) + ln(beta)`` are cut to ``-inf`` (the adaptive plausibility
constraint; ``beta = 0`` keeps all; on logits the cut is the same set as on log-probabilities), and
tokens already ruled out in ``a`` (``-inf``: masked by an earlier processor) stay ruled out.
``w_a`` and ``w_b`` are numbers or per-row tensors ``(rows, 1)`` (DeCoRe weighs by the entropy of
``a`` at each step). Instances:

* PAI's image-free guidance: ``gamma * (s - u) + u``, i.e. ``w_a = gamma, w_b = gamma - 1`` on
  log-probabilities;
* VCD and AvisC: ``(1 + alpha) * l - alpha * l_b`` on logits;
* DeCoRe: ``(1 + alpha_t) * log p - alpha_t * log p_masked`` on log-probabilities, no cutoff.

``cutoff`` is the contrast with nothing contrasted (``w_a = 1, w_b = 0``): ``f(a)`` under the
cutoff alone, the control rows' scores.
"""

from __future__ import annotations

import math

import torch

SPACES = ("log_probs", "logits")


def contrast(
    a: torch.Tensor,
    b: torch.Tensor,
    w_a: float | torch.Tensor,
    w_b: float | torch.Tensor,
    *,
    space: str = "log_probs",
    beta: float = 0.0,
) -> torch.Tensor:
    """``w_a f(a) - w_b f(b)`` under the plausibility cutoff ``beta`` (see the module docstring); float32."""
    if space not in SPACES:
        raise ValueError(f"contrast space must be one of {SPACES}, got {space!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    a = a.float()
    b = b.float().to(a.device)
    fa, fb = (torch.log_softmax(a, -1), torch.log_softmax(b, -1)) if space == "log_probs" else (a, b)
    out = torch.sub(w_a * fa, fb, alpha=w_b) if isinstance(w_b, (int, float)) else w_a * fa - w_b * fb
    if beta > 0:  # (a token already ruled out, -inf, is under any finite cut)
        ruled_out = fa < fa.max(dim=-1, keepdim=True).values + math.log(beta)
    else:
        ruled_out = torch.isneginf(fa)
    return out.masked_fill(ruled_out, float("-inf"))


def cutoff(scores: torch.Tensor, beta: float, space: str = "logits") -> torch.Tensor:
    """``f(scores)`` with the tokens under the plausibility cutoff ``beta`` set to ``-inf`` (``f`` as
    in :func:`contrast`); float32."""
    return contrast(scores, scores, 1.0, 0.0, space=space, beta=beta)


def entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(scores)`` per row, as ``(rows, 1)``."""
    logp = torch.log_softmax(scores.float(), -1)
    return -(logp.exp() * logp.nan_to_num(0.0, neginf=0.0)).sum(-1, keepdim=True)
