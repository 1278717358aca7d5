"""OPERA's over-trust scores, pure functions of the attention rows (see ``halluguard.methods.opera.method``).

Per beam, ``psi_j = 1e-7 * prod_{i >= j} sigma * w_ij`` over the response's columns ``j``, kept in log
space (one add per step), its maximum ``phi`` and argmax ``loc``, and the rollback location ``s``.
"""

from __future__ import annotations

import math

import torch

LOG_EPSILON = math.log(1e-7)  # the code's constant in psi_j = 1e-7 * prod(...)
FLOAT32_MAX = torch.finfo(torch.float32).max


def column_log_products(history: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """``log prod_{i >= j} scale * w_ij`` per column ``j`` once row ``weights`` joins the history.

    ``history (R, L)``: the sums ``sum_i log(scale * w_ij)`` over the rows already generated;
    ``weights (R, L + 1)``: the new row's weights on those ``L`` tokens and on itself. Returns
    ``(R, L + 1)``, the history of the new row's beam once it is chosen (a zero weight gives
    ``-inf``: that column's product is 0)."""
    logs = torch.log(scale * weights.float())
    return torch.cat([history, history.new_zeros(history.shape[0], 1)], -1) + logs


def over_trust(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi, loc)`` per row of ``columns`` (``column_log_products``): ``phi = 1e-7 * max_j prod``,
    in float32 and capped at its maximum, and the column ``loc`` where it is reached."""
    best, loc = columns.max(-1)
    return torch.exp(best + LOG_EPSILON).clamp(max=FLOAT32_MAX), loc


def rollback_location(locs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """From ``locs (B, N)`` (each candidate's ``loc``): each beam's most frequent location ``(B,)``
    and the most frequent of those, ``s`` (``torch.mode``, as the official code)."""
    per_beam = locs.mode(-1).values
    return per_beam, int(per_beam.mode().values)
