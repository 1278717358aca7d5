"""The single attention hook, registered in transformers' attention and mask interfaces.

``wrap`` selects ``"halluguard"`` as the attention implementation of the text backbone only and
points every text attention module at its ``Guard``. For each call the hook asks the state of
each stream in the forward (``Session.segments``: which rows belong to which stream) for edits:

* no state (outside a guarded call) or no edits: the model's own attention runs (SDPA, or eager
  when the model was loaded with eager), so results are unchanged;
* query scales (DeCoRe's uniform heads) scale the queries first, whatever else runs;
* per-head output scales and reductions only: the base attention runs, its output is scaled,
  and (for probability statistics) the last row's probabilities are recomputed (the output is
  untouched); head outputs are reported before the scales are applied;
* edits of the probabilities: the rows that need them (all rows, or only the last one) run
  through the fused operation; other rows keep the base attention.

The fused operation is the Triton kernel (``halluguard.kernels.decode_attention``) for decode-shaped
calls on CUDA, and ``reference.reference_attention`` otherwise (``dispatch`` decides; the
``HALLUGUARD_KERNEL`` variable forces either). A decode call that only asks for statistics runs the
kernel alone: its output is the attention and its statistics come from the same pass.

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

from . import dispatch
from .edits import AttentionEdit
from .reference import attention_probabilities, causal_mask, reduce_last_row, reference_attention

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
        mask = causal_mask(q_len, kv_len, query.device, first_row=0)[None, None]  # SDPA's is_causal alignment
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


def _apply_head_scales(out: torch.Tensor, scales: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """Scale head outputs ``out (B, Q, H, D)`` by each ``(head_scale (B, H), last_row_only)``."""
    for head_scale, last_row_only in scales:
        scale = torch.ones(out.shape[0], out.shape[1], out.shape[2], 1, dtype=out.dtype, device=out.device)
        rows = slice(-1, None) if last_row_only else slice(None)
        scale[:, rows] = head_scale.to(device=out.device, dtype=out.dtype)[:, None, :, None]
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
    session = guard.session if guard is not None else None
    call_kwargs = dict(kwargs, dropout=dropout, scaling=scaling, is_causal=is_causal)
    if session is None:
        return base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)

    # phase one, per stream: edits and reductions of its rows
    parts = []
    for segment in session.segments:
        rows = segment.rows
        mask = attention_mask if attention_mask is None or attention_mask.shape[0] == 1 else attention_mask[rows]
        q, k, v = query[rows], key[rows], value[rows]
        call = segment.state.describe_call(module.layer_idx, q, k)
        requests = segment.state.edits_for(call)
        if requests:
            out, weights, stats = _edited(module, q, k, v, mask, requests, base, call_kwargs)
        else:
            (out, weights), stats = base_attention(module, q, k, v, mask, base=base, **call_kwargs), []
        parts.append((segment.state, call, requests, out, weights, stats))
    # the statistics go to each stream's state, which hands them to its methods
    for state, call, requests, _, _, stats in parts:
        for (method, _), reported in zip(requests, stats):
            if reported is not None:
                state.deliver(call, method, reported)
    # phase two: head scales, given with the edit or chosen from the statistics just delivered
    outs = []
    for state, call, requests, out, _, _ in parts:
        scales = []
        for method, edit in requests:
            scale = state.late_head_scale(call, method) if edit.head_scale_from_stats else edit.head_scale
            if scale is not None:
                scales.append((scale, edit.last_row_only))
        outs.append(_apply_head_scales(out, scales))
    weights = [part[4] for part in parts]
    if len(outs) == 1:
        return outs[0], weights[0]
    return torch.cat(outs), torch.cat(weights) if all(w is not None for w in weights) else None


def _edited(module, query, key, value, attention_mask, requests, base, call_kwargs):
    """Attention of one stream's rows with its edits (head scales aside): ``(out, weights, stats)``,
    where ``stats`` holds each request's reductions (None where it asked for none)."""
    present = [name for name in _UNSUPPORTED if call_kwargs.get(name) is not None]
    if present or call_kwargs.get("cache") is not None:
        raise RuntimeError(f"halluguard cannot edit attention that uses {present or ['a paged cache']}")
    if call_kwargs["dropout"] and module.training:
        raise RuntimeError("halluguard edits attention at inference only; call model.eval() first")
    edits = [edit for _, edit in requests]
    for edit in edits:
        if edit.query_scale is not None:  # first: scores, statistics and the output all see these queries
            scale = torch.ones(query.shape[:3] + (1,), dtype=query.dtype, device=query.device)
            rows = slice(-1, None) if edit.last_row_only else slice(None)
            scale[:, :, rows] = edit.query_scale.to(device=query.device, dtype=query.dtype)[:, :, None, None]
            query = query * scale
    score_edits = [e for e in edits if e.changes_probabilities]
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = call_kwargs["is_causal"]
    # eager models receive a causal mask where sdpa_mask gives None; SDPA uses the module's flag
    causal = True if base == "eager" else (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    scaling = call_kwargs["scaling"]
    reference = dict(
        scaling=module.scaling if scaling is None else scaling, is_causal=causal, softcap=call_kwargs.get("softcap")
    )
    reductions = [e.reductions for e in edits]
    wanted = [r for r in reductions if r is not None and r.needs_probabilities]

    def last_rows_mask(rows: int) -> torch.Tensor | None:
        return attention_mask[..., -rows:, :] if attention_mask is not None else None

    def kernel(rows: int, row_edits: list[AttentionEdit]):
        """``(output of the last rows, each request's statistics)`` from the Triton kernel, or None
        when it is not chosen here or the edits do not fit it (``dispatch``)."""
        if call_kwargs.get("output_attentions") or not dispatch.use_kernel(query.device):
            return None
        launch = dispatch.fold(
            row_edits, reductions, rows=rows, mask=last_rows_mask(rows), causal=causal, kv_len=kv_len,
            first_row=q_len - rows, device=query.device,
        )  # fmt: skip
        if launch is None:
            return None
        edited, found = dispatch.run_kernel(
            query[:, :, -rows:], key, value, launch, scaling=reference["scaling"], softcap=reference["softcap"]
        )
        return edited, dispatch.split_stats(launch, reductions, found)

    weights, probs, kernel_stats = None, None, None
    if score_edits:
        reported_rows = max((r.headmax_rows for r in reductions if r is not None), default=1)
        rows = q_len if any(not e.last_row_only for e in score_edits) or reported_rows > 1 else 1
        row_edits = [_for_rows(e, rows) for e in score_edits]
        ran = kernel(rows, row_edits)
        if ran is not None:
            edited, kernel_stats = ran
        else:
            edited, probs = reference_attention(
                query[:, :, -rows:], key, value, mask=last_rows_mask(rows), edits=row_edits, first_row=q_len - rows,
                **reference,
            )  # fmt: skip
        if rows == q_len:
            out = edited
            weights = probs.to(query.dtype) if call_kwargs.get("output_attentions") else None
        else:
            out, _ = base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
            out = torch.cat([out[:, :-rows], edited], dim=1)
    else:
        # statistics only (or nothing): the model's own output; the last rows' probabilities recomputed
        rows = min(max((r.headmax_rows for r in wanted), default=1), q_len)
        ran = kernel(rows, []) if wanted else None
        if ran is not None:
            edited, kernel_stats = ran
        if ran is not None and rows == q_len:  # a decode-shaped call: the kernel's output is the attention
            out = edited
        else:
            out, weights = base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
        if wanted and ran is None:
            probs = attention_probabilities(
                query[:, :, -rows:], key, mask=last_rows_mask(rows), first_row=q_len - rows, **reference
            )
    stats: list[dict[str, torch.Tensor] | None] = []
    for index, edit in enumerate(edits):
        asked, reported = edit.reductions, None
        if asked is not None:
            if kernel_stats is not None:
                reported = kernel_stats[index]
            elif asked.needs_probabilities:
                reported = reduce_last_row(probs[:, :, -1], asked, probs[:, :, -asked.headmax_rows :])
            else:
                reported = {}
            if asked.head_outputs:
                reported["head_outputs"] = out[:, -1].float()
        stats.append(reported)
    return out, weights, stats


AttentionInterface.register(HOOK_NAME, halluguard_attention)
AttentionMaskInterface.register(HOOK_NAME, sdpa_mask)
