"""The single attention hook, registered in transformers' attention and mask interfaces.

``wrap`` selects ``"halluguard"`` as the attention implementation of the text backbone only and
points every text attention module at its ``Guard``. For each call the hook asks the guard's
current ``GuardState`` for edits:

* no state (outside a guarded call) or no edits: the model's own attention runs (SDPA, or eager
  when the model was loaded with eager), so results are unchanged;
* per-head output scales and reductions only: the base attention runs, its output is scaled,
  and (for probability statistics) the last row's probabilities are recomputed (the output is
  untouched); head outputs are reported before the scales are applied;
* edits of the probabilities: the rows that need them (all rows, or only the last one) run
  through the fused operation ``reference.reference_attention``; other rows keep the base
  attention.

The mask interface entry is ``sdpa_mask``: a boolean mask (True = attend), or ``None`` when the
mask is plainly causal, so padding, sliding windows and prefix-LM masks all arrive here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .edits import AttentionEdit
from .reference import causal_mask, reduce_last_row, reference_attention

HOOK_NAME = "halluguard"
GUARD_ATTRIBUTE = "_halluguard_guard"


def _eager_for(module: nn.Module) -> Callable:
    """The eager attention function defined beside this module's class (family specifics kept)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The boolean/None mask of ``sdpa_mask`` as the additive float mask eager attention expects.

    ``sdpa_mask`` returns None only for a plainly causal mask, so None means causal here whatever
    the module's ``is_causal`` says (eager models always receive that causal mask)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if q_len == 1:
            return None
        mask = causal_mask(q_len, kv_len, query.device)[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def base_attention(module: nn.Module, query, key, value, attention_mask, *, base: str, **kwargs):
    """The attention the model would run without the guard: ``(output, weights or None)``."""
    if base == "eager":
        kwargs.pop("is_causal", None)
        mask = _additive_mask(attention_mask, query, key)
        return _eager_for(module)(module, query, key, value, mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _apply_head_scales(out: torch.Tensor, edits: list[AttentionEdit]) -> torch.Tensor:
    """Scale head outputs ``out (B, Q, H, D)`` by every edit's ``head_scale (B, H)``."""
    for edit in edits:
        if edit.head_scale is not None:
            scale = torch.ones(out.shape[0], out.shape[1], out.shape[2], 1, dtype=out.dtype, device=out.device)
            rows = slice(-1, None) if edit.last_row_only else slice(None)
            scale[:, rows] = edit.head_scale.to(out.dtype)[:, None, :, None]
            out = out * scale
    return out


def _for_rows(edit: AttentionEdit, rows: int) -> AttentionEdit:
    """The score part of an edit for the last ``rows`` query rows (head scales are applied apart)."""
    spec = edit.redistribution
    if spec is not None and spec.query_mask is not None:
        spec = dataclasses.replace(spec, query_mask=spec.query_mask[:, -rows:])
    return dataclasses.replace(edit, head_scale=None, redistribution=spec)


_UNSUPPORTED = ("position_bias", "s_aux", "sinks")


def halluguard_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function with the transformers interface signature (see module docstring)."""
    guard = getattr(module, GUARD_ATTRIBUTE, None)
    base = guard.base_attention if guard is not None else "sdpa"
    state = guard.state if guard is not None else None
    call_kwargs = dict(kwargs, dropout=dropout, scaling=scaling, is_causal=is_causal)
    if state is None:
        return base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)

    call = state.describe_call(module.layer_idx, query, key)
    requests = state.edits_for(call)
    if not requests:
        return base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
    present = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if present or kwargs.get("cache") is not None:
        raise RuntimeError(f"halluguard cannot edit attention that uses {present or ['a paged cache']}")
    if dropout and module.training:
        raise RuntimeError("halluguard edits attention at inference only; call model.eval() first")

    edits = [edit for _, edit in requests]
    score_edits = [e for e in edits if e.changes_probabilities]
    q_len = query.shape[2]
    # eager models receive a causal mask where sdpa_mask gives None; SDPA uses the module's flag
    causal = True if base == "eager" else (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    reference = dict(
        scaling=module.scaling if scaling is None else scaling, is_causal=causal, softcap=kwargs.get("softcap")
    )
    weights = None
    if score_edits:
        rows = q_len if any(not e.last_row_only for e in score_edits) else 1
        mask = attention_mask[..., -rows:, :] if attention_mask is not None else None
        edited, probs = reference_attention(
            query[:, :, -rows:], key, value, mask=mask, edits=[_for_rows(e, rows) for e in score_edits], **reference
        )
        if rows == q_len:
            out = edited
            weights = probs.to(query.dtype) if kwargs.get("output_attentions") else None
        else:
            out, _ = base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
            out = torch.cat([out[:, :-rows], edited], dim=1)
    else:
        out, weights = base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
        probs = None
        if any(e.reductions is not None and e.reductions.needs_probabilities for e in edits):
            # statistics only: the model's own output stays; the last row's probabilities are recomputed
            mask = attention_mask[..., -1:, :] if attention_mask is not None else None
            _, probs = reference_attention(query[:, :, -1:], key, value, mask=mask, **reference)
    for method, edit in requests:
        if edit.reductions is not None:
            stats = reduce_last_row(probs[:, :, -1], edit.reductions) if edit.reductions.needs_probabilities else {}
            if edit.reductions.head_outputs:
                stats["head_outputs"] = out[:, -1].float()
            method.on_stats(state, call, stats)
    return _apply_head_scales(out, edits), weights


AttentionInterface.register(HOOK_NAME, halluguard_attention)
AttentionMaskInterface.register(HOOK_NAME, sdpa_mask)
