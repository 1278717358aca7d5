"""The single attention hook, registered in transformers' attention and mask interfaces.

``wrap`` selects ``"halluguard"`` as the attention implementation of the text backbone only and
points every text attention module at its ``Guard``. For each call the hook asks the guard's
current ``GuardState`` for edits:

* no state (outside a guarded ``generate``) or no edits: the model's own attention runs
  (SDPA, or eager when the model was loaded with eager), so results are unchanged;
* only per-head output scales: the base attention runs and its output is scaled;
* score edits or reductions: the rows that need them (all rows, or only the last one) run
  through the fused operation ``reference.reference_attention``; other rows keep the base
  attention.

The mask interface entry is ``sdpa_mask``: a boolean mask (True = attend), or ``None`` when the
mask is plainly causal, so padding, sliding windows and prefix-LM masks all arrive here.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .edits import merge_reductions
from .reference import reference_attention

HOOK_NAME = "halluguard"
GUARD_ATTRIBUTE = "_halluguard_guard"


def _eager_for(module: nn.Module) -> Callable:
    """The eager attention function defined beside this module's class (family specifics kept)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                   is_causal: bool) -> torch.Tensor | None:
    """The boolean/None mask of ``sdpa_mask`` as the additive float mask eager attention expects."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if not (is_causal and q_len > 1):
            return None
        rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def base_attention(module: nn.Module, query, key, value, attention_mask, *, base: str, **kwargs):
    """The attention the model would run without the guard."""
    if base == "eager":
        is_causal = kwargs.pop("is_causal", None)
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        mask = _additive_mask(attention_mask, query, key, is_causal)
        return _eager_for(module)(module, query, key, value, mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _apply_head_scales(out: torch.Tensor, edits) -> torch.Tensor:
    """Scale head outputs ``out (B, Q, H, D)`` by every edit's ``head_scale (B, H)``."""
    for edit in edits:
        if edit.head_scale is not None:
            rows = slice(-1, None) if edit.last_row_only else slice(None)
            out[:, rows] = out[:, rows] * edit.head_scale.to(out.dtype)[:, None, :, None]
    return out


def halluguard_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention function with the transformers interface signature (see module docstring)."""
    guard = getattr(module, GUARD_ATTRIBUTE, None)
    base = guard.base_attention if guard is not None else "sdpa"
    state = guard.state if guard is not None else None
    call_kwargs = dict(kwargs, dropout=dropout, scaling=scaling, is_causal=is_causal)
    if state is None:
        return base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)

    call = state.describe_call(module.layer_idx, query, key)
    edits = state.edits_for(call)
    if not edits:
        return base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)

    reductions = merge_reductions(edits)
    score_edits = [dataclasses.replace(e, head_scale=None) for e in edits if e.edits_scores]
    if score_edits or reductions is not None:
        if dropout and module.training:
            raise RuntimeError("halluguard edits attention at inference only; call model.eval() first")
        q_len = query.shape[2]
        rows = q_len if any(not e.last_row_only for e in score_edits) else 1
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        mask = attention_mask[..., -rows:, :] if attention_mask is not None else None
        scale = module.scaling if scaling is None else scaling
        edited, stats = reference_attention(query[:, :, -rows:], key, value, scaling=scale, mask=mask,
                                            is_causal=causal, softcap=kwargs.get("softcap"),
                                            edits=score_edits, reductions=reductions)
        state.record(call, stats)
        if rows == q_len:
            out = edited
        else:
            out, _ = base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
            out = out.clone()
            out[:, -rows:] = edited
    else:
        out, _ = base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
    return _apply_head_scales(out, edits), None


AttentionInterface.register(HOOK_NAME, halluguard_attention)
AttentionMaskInterface.register(HOOK_NAME, sdpa_mask)
