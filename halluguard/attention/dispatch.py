"""Which implementation of the fused operation runs a call: the Triton kernel or the reference.

The kernel (``halluguard.kernels.decode_attention``) takes decode-shaped calls: at most
``KERNEL_MAX_ROWS`` query rows (a decode step, OPERA's candidates side by side, the last prompt row),
with edits that fold into its single form: at most one ``key_boost`` (no bias before it), any number of
``key_bias`` (summed), at most one redistribution, and, with several rows, no edit restricted to the
last row. Everything else, and any call that returns attention weights, runs the reference.

``HALLUGUARD_KERNEL`` chooses: ``triton`` forces the kernel (on CPU tensors it needs the Triton
interpreter, ``TRITON_INTERPRET=1``, which is how the tests reach it end to end), ``reference`` forces
the PyTorch path, and unset (or ``auto``) takes the kernel for CUDA tensors when Triton is installed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from .derived import Derived
from .edits import AttentionEdit, Reductions
from .reference import allowed_keys

ENV = "HALLUGUARD_KERNEL"
MODES = ("auto", "triton", "reference")
KERNEL_MAX_ROWS = 64


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r} is not a mode; use one of {', '.join(MODES)} (or leave it unset)")
    return mode


def use_kernel(device: torch.device) -> bool:
    """Whether calls on ``device`` go to the Triton kernel (when their shape and edits fit it)."""
    from halluguard.kernels._compat import HAS_TRITON, interpreting

    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "auto":
        return device.type == "cuda" and HAS_TRITON and not interpreting()
    if not HAS_TRITON:
        raise RuntimeError(f"{ENV}=triton needs the triton package (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{ENV}=triton on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before Python starts (it runs the kernel on CPU, slowly: for tests)"
        )
    return True


@dataclasses.dataclass
class KernelCall:
    """The arguments of one kernel launch, folded from a call's edits and reductions."""

    arguments: dict
    groups: list[tuple[int, str]]  # (request index, group name) per column of group_weights


def fold(
    edits: Sequence[AttentionEdit],
    reductions: Sequence[Reductions | None],
    *,
    rows: int,
    mask: torch.Tensor | None,
    causal: bool,
    kv_len: int,
    first_row: int,
    device: torch.device,
    derived: Derived | None = None,
) -> KernelCall | None:
    """The kernel's arguments for these edits (already cut to the last ``rows`` query rows) and each
    request's reductions, or None when they do not fit the kernel (see the module docstring). With
    ``derived``, the mask's and the groups' forms are made once for the calls that share them."""
    if rows > KERNEL_MAX_ROWS or any(r is not None and r.last_row_values for r in reductions):
        return None  # (the kernel reports no probability rows)
    boost, bias, redistribution = None, None, None
    for edit in edits:
        if rows > 1 and edit.last_row_only and edit.changes_probabilities:
            return None
        if edit.key_boost is not None:
            if boost is not None or bias is not None:
                return None
            boost = edit.key_boost
        if edit.key_bias is not None:
            bias = edit.key_bias if bias is None else _per_head(bias) + _per_head(edit.key_bias)
        if edit.redistribution is not None:
            if redistribution is not None:
                return None
            redistribution = edit.redistribution  # (the kernel reads its sets' first kv_len keys)
    if mask is not None and not (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1] == 1)):
        return None  # a per-head mask
    allowed = _kernel_mask(mask, causal, rows, kv_len, first_row, device, derived)
    group_weights, groups = _group_columns(reductions, derived)
    arguments = dict(
        allowed=allowed,
        first_row=first_row,
        key_boost=boost,
        key_bias=bias,
        redistribution=redistribution,
        group_weights=group_weights,
        head_rows=any(r is not None and (r.headmax_from_key is not None or r.head_mean_row) for r in reductions),
    )
    return KernelCall(arguments, groups)


def _kernel_mask(mask, causal, rows, kv_len, first_row, device, derived) -> torch.Tensor | None:
    """The kernel's ``allowed (B|1, R, T)`` from the model's mask (None: causal), made once per mask."""

    def make() -> torch.Tensor | None:
        allowed = allowed_keys(mask, causal, rows, kv_len, device, first_row)
        if allowed is not None:
            return allowed[None] if allowed.dim() == 2 else allowed[:, 0]
        if rows > 1:  # not causal, no mask: every key (the kernel reads None as causal)
            return torch.ones(1, rows, kv_len, dtype=torch.bool, device=device)
        return None

    settings = (rows, kv_len, first_row, causal, device)
    return make() if derived is None else derived.get("kernel mask", (mask,), make, key=settings)


def _group_columns(reductions, derived) -> tuple[torch.Tensor | None, list[tuple[int, str]]]:
    """Every request's key groups as the kernel's ``group_weights (B, NG, T)`` (made once for the same
    groups), and the (request index, group name) of each column."""
    columns, groups = [], []
    for index, wanted in enumerate(reductions):
        for name, weights in (wanted.group_masses if wanted is not None else {}).items():
            columns.append(weights)
            groups.append((index, name))
    if not columns:
        return None, groups

    def stacked() -> torch.Tensor:
        return torch.stack(columns, dim=1)

    return (stacked() if derived is None else derived.get("kernel groups", tuple(columns), stacked)), groups


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, 1, T): per-key tensors of both shapes add up as (B, H|1, T)."""
    return t[:, None] if t.dim() == 2 else t


def split_stats(
    call: KernelCall, reductions: Sequence[Reductions | None], stats: dict[str, torch.Tensor]
) -> list[dict[str, torch.Tensor] | None]:
    """The kernel's statistics as each request's reductions report them (``reference.reduce_last_row``)."""
    out: list[dict[str, torch.Tensor] | None] = [None if r is None else {} for r in reductions]
    if call.groups:
        for (index, name), mass in zip(call.groups, stats["mass"][:, -1].unbind(-1)):
            out[index][f"mass/{name}"] = mass
    for index, wanted in enumerate(reductions):
        if wanted is None:
            continue
        if wanted.headmax_from_key is not None:
            several = wanted.headmax_rows > 1
            head_max = stats["head_max"][:, -wanted.headmax_rows :] if several else stats["head_max"][:, -1]
            out[index]["headmax_row"] = head_max[..., wanted.headmax_from_key :]
            out[index]["headmax_sum"] = head_max.sum(-1)
        if wanted.head_mean_row:
            out[index]["head_mean_row"] = stats["head_mean"][:, -1]
    return out


def run_kernel(query, key, value, call: KernelCall, *, scaling: float, softcap: float | None, workspace=None):
    from halluguard.kernels.decode_attention import decode_attention

    return decode_attention(query, key, value, scaling=scaling, softcap=softcap, workspace=workspace, **call.arguments)
