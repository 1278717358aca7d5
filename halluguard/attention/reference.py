"""Pure-PyTorch reference of the fused, edited attention: the CPU path and the kernel's oracle.

Given ``query (B, H, R, D)`` (the last ``R`` query rows of a call), ``key``/``value``
``(B, Hkv, T, D)`` (the whole KV cache, not repeated for grouped-query attention) and the model's
mask, it computes, in float32:

1. ``z = scaling * q k^T`` (optionally soft-capped: ``z = c * tanh(z / c)``);
2. score edits of each ``AttentionEdit`` in order: ``z += boost * |z|``, then ``z += bias``;
3. the model's mask, then ``a = softmax(z)`` (a fully masked row gives zeros, not NaN);
4. redistributions (see ``Redistribution``): ``a' = a`` except on selected rows, where source
   keys keep ``keep * a`` and target keys gain ``(1 - keep) * M_src * a_k / M_tgt``;
5. ``o = a' v``, then the per-head output scales;

and returns the final probabilities ``a'`` beside the output, from which the hook reduces the
statistics methods asked for. The output has the layout the transformers attention interface
returns, ``(B, R, H, D)``, in the query's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .derived import Derived
from .edits import AttentionEdit, Redistribution, Reductions


def _per_key(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T) or (B, H, T) -> (B, H|1, 1, T), for broadcasting over heads and query rows."""
    if t.dim() == 2:
        return t[:, None, None, :]
    if t.dim() == 3 and t.shape[1] in (1, num_heads):
        return t[:, :, None, :]
    raise ValueError(f"per-key edit tensor must be (B, T) or (B, H, T), got {tuple(t.shape)}")


def _rows(edit: AttentionEdit, num_rows: int) -> slice:
    return slice(num_rows - 1, num_rows) if edit.last_row_only else slice(0, num_rows)


def causal_mask(num_rows: int, kv_len: int, device: torch.device, first_row: int | None = None) -> torch.Tensor:
    """(R, T) bool: query row ``r`` sees keys ``j <= first_row + r``.

    ``first_row`` is the key index of the first row. The default, ``T - R``, makes the rows the last
    ``R`` tokens of the keys; a static cache's prompt forward has more key slots than tokens, and its
    rows start at key 0 (SDPA's own causal alignment: row ``i`` of ``Q`` query rows sees keys
    ``j <= i``), so the hook passes ``first_row = Q - R`` for the last ``R`` of its ``Q`` rows."""
    start = kv_len - num_rows if first_row is None else first_row
    rows = torch.arange(start, start + num_rows, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= rows


def allowed_keys(
    mask: torch.Tensor | None,
    is_causal: bool,
    num_rows: int,
    kv_len: int,
    device: torch.device,
    first_row: int | None = None,
) -> torch.Tensor | None:
    """Boolean (.., R, T) mask of the keys each query row may see, or None for "all"."""
    if mask is not None:
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2  # additive masks use dtype-min (or -inf) for "blocked"
    if is_causal and num_rows > 1:
        return causal_mask(num_rows, kv_len, device, first_row)
    return None


def redistribute(probs: torch.Tensor, spec: Redistribution, rows: slice) -> torch.Tensor:
    """Apply one redistribution to ``probs (B, H, R, T)`` on the query rows ``rows``.

    The masses on the key sets come from one product with their indicator columns; the edit is then
    one factor per key, ``f_S`` on source keys and ``f_T`` on target keys, 1 elsewhere."""
    num_heads = probs.shape[1]
    p = probs[:, :, rows]
    spec = spec.cut(probs.shape[-1])
    source = _per_key(spec.source, num_heads)  # (B, H|1, 1, T) bool
    target = _per_key(spec.target, num_heads) & ~source
    sets = [source, target]
    if spec.gate is not None:
        gate = _per_key(spec.gate, num_heads)
        sets += [gate, gate & source]
    heads = max(s.shape[1] for s in sets)
    columns = torch.cat([s.expand(-1, heads, -1, -1) for s in sets], dim=2).to(p.dtype)  # (B, H|1, S, T)
    masses = torch.matmul(p, columns.transpose(-1, -2))  # (B, H, R, S)
    m_src, m_tgt = masses[..., 0:1], masses[..., 1:2]
    select = m_tgt > 0
    if spec.gate is not None:
        m_gate, m_gate_src = masses[..., 2:3], masses[..., 3:4]
        select = select & (m_gate >= spec.gate_min_mass) & (m_gate_src <= spec.gate_max_source_share * m_gate)
    if spec.query_mask is not None:
        select = select & spec.query_mask[:, None, rows, None]
    gain = (1.0 - spec.keep) * m_src / m_tgt.clamp_min(torch.finfo(p.dtype).tiny)
    factor = (
        1.0
        + torch.where(select, spec.keep - 1.0, 0.0) * columns[:, :, 0:1]
        + torch.where(select, gain, 0.0) * columns[:, :, 1:2]
    )
    edited = p * factor
    if rows.start in (0, None) and rows.stop in (None, probs.shape[2]):  # every row: no copy
        return edited
    out = probs.clone()
    out[:, :, rows] = edited
    return out


def group_weights(groups: dict[str, torch.Tensor], derived: Derived | None = None) -> torch.Tensor | None:
    """The key groups ``name -> (B, T)`` (sets or weights) as the columns ``(B, T, G)`` of one product, in
    float32 (made once while the groups are the same tensors, with ``derived``), or None for no groups."""
    if not groups:
        return None

    def make() -> torch.Tensor:
        return torch.stack(list(groups.values()), dim=-1).to(torch.float32)

    return make() if derived is None else derived.get("group weights", tuple(groups.values()), make)


def reduce_last_row(
    probs_last: torch.Tensor,
    reductions: Reductions,
    probs_rows: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of the last query row ``probs_last (B, H, T)``; the head-max rows come from
    ``probs_rows (B, H, R, T)``, the last ``R = reductions.headmax_rows`` rows, when that is above 1.
    The group masses are one product with the groups' columns ``weights`` (``group_weights``)."""
    stats: dict[str, torch.Tensor] = {}
    if reductions.group_masses:
        if weights is None:
            weights = group_weights(reductions.group_masses)
        masses = torch.bmm(probs_last, weights.to(probs_last.dtype))  # (B, H, G)
        for name, mass in zip(reductions.group_masses, masses.unbind(-1)):
            stats[f"mass/{name}"] = mass
    if reductions.headmax_from_key is not None:
        several = reductions.headmax_rows > 1
        head_max = (probs_rows if several else probs_last).amax(dim=1)  # (B, R, T) or (B, T)
        stats["headmax_row"] = head_max[..., reductions.headmax_from_key :]
        stats["headmax_sum"] = head_max.sum(-1)
    if reductions.head_mean_row:
        stats["head_mean_row"] = probs_last.float().mean(dim=1)
    if reductions.last_row_values:
        stats["last_row"] = probs_last.float()
    return stats


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = True,
    softcap: float | None = None,
    edits: Sequence[AttentionEdit] = (),
    first_row: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Steps 1-3 of the module docstring: the probabilities ``(B, H, R, T)`` in ``compute_dtype``
    (float32; float64 makes the tests' oracle), before any redistribution (what statistics of
    unedited attention need; the values are never read)."""
    bsz, num_heads, num_rows, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads")
    groups = num_heads // kv_heads
    q = query.to(compute_dtype).reshape(bsz, kv_heads, groups, num_rows, head_dim)
    scores = (
        torch.einsum("bkgrd,bktd->bkgrt", q, key.to(compute_dtype)).reshape(bsz, num_heads, num_rows, kv_len) * scaling
    )
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    row_ids = torch.arange(num_rows, device=query.device)[None, None, :, None]
    for edit in edits:
        on_rows = row_ids == num_rows - 1 if edit.last_row_only else torch.ones_like(row_ids, dtype=torch.bool)
        if edit.key_boost is not None:
            scores = scores + torch.where(
                on_rows, _per_key(edit.key_boost, num_heads).to(compute_dtype) * scores.abs(), 0.0
            )
        if edit.key_bias is not None:
            scores = scores + torch.where(on_rows, _per_key(edit.key_bias, num_heads).to(compute_dtype), 0.0)
    allowed = allowed_keys(mask, is_causal, num_rows, kv_len, scores.device, first_row)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = True,
    softcap: float | None = None,
    edits: Sequence[AttentionEdit] = (),
    first_row: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edited attention for the query rows given; see the module docstring for the math.

    ``mask`` is the model's mask for these rows: boolean ``(B, 1|H, R, T)`` (True = attend),
    additive float, or None (then ``is_causal`` decides, the first row at key ``first_row``: see
    ``causal_mask``). Returns ``(output (B, R, H, D), probabilities (B, H, R, T) in float32)``
    (``compute_dtype`` float64 makes the tests' oracle).
    """
    bsz, num_heads, num_rows, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = num_heads // kv_heads
    probs = attention_probabilities(
        query,
        key,
        scaling=scaling,
        mask=mask,
        is_causal=is_causal,
        softcap=softcap,
        edits=edits,
        first_row=first_row,
        compute_dtype=compute_dtype,
    )
    v = value.to(compute_dtype)

    for edit in edits:
        if edit.redistribution is not None:
            probs = redistribute(probs, edit.redistribution, _rows(edit, num_rows))

    out = torch.einsum("bkgrt,bktd->bkgrd", probs.reshape(bsz, kv_heads, groups, num_rows, kv_len), v)
    out = out.reshape(bsz, num_heads, num_rows, head_dim)
    for edit in edits:
        if edit.head_scale is not None:
            rows = _rows(edit, num_rows)
            scale = torch.ones(bsz, num_heads, num_rows, 1, device=out.device, dtype=compute_dtype)
            scale[:, :, rows] = edit.head_scale.to(compute_dtype)[:, :, None, None]
            out = out * scale
    return out.transpose(1, 2).to(query.dtype), probs


def fused_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    allowed: torch.Tensor | None = None,
    first_row: int | None = None,
    key_boost: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    redistribution: Redistribution | None = None,
    head_scale: torch.Tensor | None = None,
    group_weights: torch.Tensor | None = None,
    head_rows: bool = False,
    num_splits: int | None = None,
    block_t: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Triton kernel's operation in PyTorch, with its signature and outputs
    (``halluguard.kernels.decode_attention.decode_attention``): one edit made of the arguments, run
    through ``reference_attention``, and the statistics reduced from its final probabilities.
    ``num_splits`` and ``block_t`` shape the kernel's work only and are ignored here;
    ``compute_dtype`` float64 makes the tests' oracle."""
    edit = AttentionEdit(key_boost=key_boost, key_bias=key_bias, redistribution=redistribution, head_scale=head_scale)
    mask = None if allowed is None else allowed.to(torch.bool)[:, None]
    out, probs = reference_attention(
        query,
        key,
        value,
        scaling=scaling,
        mask=mask,
        softcap=softcap,
        edits=[edit],
        first_row=first_row,
        compute_dtype=compute_dtype,
    )
    stats: dict[str, torch.Tensor] = {}
    if group_weights is not None:
        stats["mass"] = torch.einsum("bhrt,bgt->brhg", probs, group_weights.to(probs.dtype))
    if head_rows:
        stats["head_max"] = probs.amax(dim=1)
        stats["head_mean"] = probs.mean(dim=1)
    return out, stats
