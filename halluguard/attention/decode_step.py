"""The edited attention of a decode step in a few batched products: the CPU path for one query row.

For a call with one query row per batch row it computes what ``reference.reference_attention``
computes, in float32, with each product one batched matrix product over ``B * H_kv`` matrices (the
``G = H / H_kv`` query heads that share a key/value head are the rows of one matrix), and every
tensor made from the mask or an edit made once for all the calls that share it (``Derived``):

1. ``z = s q k^T + m`` in one ``baddbmm``, where ``m`` is the model's mask as an additive bias (0
   where a key may be seen, ``-inf`` where not: the lowest finite float when a boost follows) plus
   the edits' key biases;
2. a key boost ``z += b |z|`` in one ``addcmul``, ``b`` zero on blocked keys so that they stay
   blocked (at most one boost, and no bias in an edit before it: the order of the reference);
3. ``a = softmax(z)`` (a decode row always sees its own key, so no row is fully masked);
4. a redistribution: the masses on four key columns ``C = [T, S, gate - g_min, rho * gate - gate & S]``
   (``T`` the target keys outside the source ``S``) in one product ``M = a C``. Because a row's
   probabilities sum to 1, the gate's two conditions are the signs of the last two masses (a row
   within float rounding of ``g_min`` may fall on the other side than in the reference), so a
   row is selected when ``M >= (tiny, -inf, 0, 0)``, ``tiny`` the smallest positive float (the
   target holds some mass). The edited row is ``a' = a * (1 + w F^T)`` with the factor columns
   ``F = [(keep - 1) S, (1 - keep) T, 0, 0]`` and ``w = M / M_T = [1, M_S / M_T, ...]`` on selected
   rows, 0 elsewhere: source keys keep ``keep`` of their mass and target keys gain
   ``(1 - keep) M_S a_k / M_T``, the reference's ``redistribute``. A query mask folds into ``T``;
5. ``o = a' v``.

``fits`` says whether a call's edits have this form; anything else runs the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .derived import PER_LAYER, Derived
from .edits import AttentionEdit, Redistribution
from .reference import allowed_keys


def _per_row(t: torch.Tensor | None) -> bool:
    """A per-key tensor that is the same for every head: ``(B, T)`` or ``(B, 1, T)``."""
    return t is None or t.dim() == 2 or (t.dim() == 3 and t.shape[1] == 1)


def fits(query: torch.Tensor, edits: Sequence[AttentionEdit], softcap: float | None) -> bool:
    """Whether a call with these query rows and (score) edits takes this path (see the module docstring)."""
    if query.shape[2] != 1 or softcap is not None:
        return False
    boosts = redistributions = 0
    for edit in edits:
        if edit.key_boost is not None:
            if boosts or any(e.key_bias is not None for e in edits):
                return False  # the boost must see the scores before any bias: kept to the reference
            boosts += 1
        spec = edit.redistribution
        if spec is not None:
            redistributions += 1
            if redistributions > 1 or not all(_per_row(t) for t in (spec.source, spec.target, spec.gate)):
                return False
    return True


def _as_matrices(t: torch.Tensor, batch: int, num_heads: int, kv_heads: int) -> torch.Tensor:
    """A per-key tensor ``(B|1, T)`` or ``(B|1, 1|H, T)`` laid out as ``(B * H_kv, G|1, T)``, beside the scores."""
    if t.dim() == 2:
        t = t[:, None]
    if t.shape[1] == 1:
        return t[:, None].expand(batch, kv_heads, 1, t.shape[-1]).reshape(batch * kv_heads, 1, t.shape[-1])
    return t.expand(batch, num_heads, t.shape[-1]).reshape(batch * kv_heads, num_heads // kv_heads, t.shape[-1])


def _allowed(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The model's mask for one query row as booleans ``(B|1, 1|H, T)`` (True = may be seen), or None."""
    if mask is None:
        return None
    allowed = allowed_keys(mask, True, 1, mask.shape[-1], mask.device)
    return allowed.reshape(allowed.shape[0], -1, allowed.shape[-1]) if allowed.dim() == 4 else allowed


def _key_bias(mask, edits, shape, derived: Derived, device, boosted: bool) -> torch.Tensor | None:
    """The scores' additive term ``(B * H_kv, G|1, T)``: the mask plus the key biases. A boosted call
    blocks with the lowest finite float (the boost reads ``|z|``, zero on blocked keys); others block
    with ``-inf``, so that a row whose biases block every key it may see gives zeros, as the reference."""
    biases = [e.key_bias for e in edits if e.key_bias is not None]
    if mask is None and not biases:
        return None

    def make() -> torch.Tensor:
        batch, num_heads, kv_heads = shape
        total = torch.zeros(1, 1, dtype=torch.float32, device=device)
        for bias in biases:
            total = total + (bias[:, None] if bias.dim() == 2 else bias).to(torch.float32)
        allowed = _allowed(mask)
        if allowed is not None:
            total = torch.where(allowed, total, torch.finfo(torch.float32).min if boosted else -torch.inf)
        return _as_matrices(total, batch, num_heads, kv_heads)

    return derived.get("key bias", (mask, *biases), make, key=(shape, boosted))


def _key_boost(mask, boost: torch.Tensor, shape, derived: Derived) -> torch.Tensor:
    """The boost ``b`` as ``(B * H_kv, G|1, T)``, zero on blocked keys."""

    def make() -> torch.Tensor:
        batch, num_heads, kv_heads = shape
        b = (boost[:, None] if boost.dim() == 2 else boost).to(torch.float32)
        allowed = _allowed(mask)
        if allowed is not None:
            b = torch.where(allowed, b, 0.0)
        return _as_matrices(b, batch, num_heads, kv_heads)

    return derived.get("key boost", (mask, boost), make, key=shape)


def _columns(spec: Redistribution, derived: Derived, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mass columns ``C (B, T', 4)``, the factor columns ``F^T (B, 4, T')`` and the selection's lower
    bounds (module docstring, step 4), ``T'`` the length of the spec's key sets (kept per layer: a
    method's sets may differ from layer to layer and stay the same from step to step)."""

    def make():
        def flat(t):
            return (t[:, 0] if t.dim() == 3 else t).to(torch.float32)

        source = flat(spec.source)
        target = flat(spec.target) * (1.0 - source)
        if spec.query_mask is not None:  # an ineligible row has no target mass, so it is never selected
            target = target * spec.query_mask[:, -1:].to(torch.float32)
        if spec.gate is not None:
            gate = flat(spec.gate)
            gate_terms = [gate - spec.gate_min_mass, spec.gate_max_source_share * gate - gate * source]
        else:
            gate_terms = [torch.zeros_like(source)] * 2
        columns = torch.stack([target, source, *gate_terms], dim=-1)
        factors = torch.stack(
            [(spec.keep - 1.0) * source, (1.0 - spec.keep) * target, *[torch.zeros_like(source)] * 2], dim=1
        )
        tiny = torch.nextafter(torch.zeros(()), torch.ones(())).item()
        lower = torch.tensor([tiny, -torch.inf, 0.0, 0.0], device=source.device)
        return columns, factors, lower

    sources = (spec.source, spec.target, spec.gate, spec.query_mask)
    settings = (layer, spec.keep, spec.gate_min_mass, spec.gate_max_source_share)
    return derived.get("redistribution", sources, make, key=settings, keep=PER_LAYER)


def _redistribute(probs: torch.Tensor, spec: Redistribution, derived: Derived, layer: int) -> torch.Tensor:
    """Step 4 on ``probs (B, H, T)``."""
    columns, factors, lower = _columns(spec, derived, layer)
    kv_len = probs.shape[-1]
    masses = torch.bmm(probs, columns[:, :kv_len])  # (B, H, 4)
    selected = (masses >= lower).all(-1, keepdim=True)
    weights = torch.where(selected, masses / masses[..., :1], _constant(derived, probs.device, 0.0))
    return probs * torch.baddbmm(_constant(derived, probs.device, 1.0), weights, factors[..., :kv_len])


def _constant(derived: Derived, device: torch.device, value: float) -> torch.Tensor:
    """``value`` as a float32 ``(1, 1, 1)`` tensor on ``device``, made once."""
    return derived.get("constant", (), lambda: torch.full((1, 1, 1), value, device=device), key=(value, device))


def _probabilities(query, key, *, scaling, mask, edits, derived, layer) -> torch.Tensor:
    """Steps 1-4 of the module docstring: the final probabilities ``(B * H_kv, G, T)``."""
    batch, num_heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads")
    shape = (batch, num_heads, kv_heads)
    q = query.to(torch.float32).reshape(batch * kv_heads, num_heads // kv_heads, head_dim)
    k = key.to(torch.float32).reshape(batch * kv_heads, kv_len, head_dim)
    boost = next((e.key_boost for e in edits if e.key_boost is not None), None)
    biases = any(e.key_bias is not None for e in edits)
    bias = _key_bias(mask, edits, shape, derived, query.device, boosted=boost is not None)
    if bias is None:
        scores = torch.baddbmm(_constant(derived, q.device, 0.0), q, k.transpose(1, 2), beta=0.0, alpha=scaling)
    else:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling)
    if boost is not None:
        scores = torch.addcmul(scores, scores.abs(), _key_boost(mask, boost, shape, derived))
    probs = torch.softmax(scores, dim=-1)
    if biases:  # a key bias may block every key of a row (-inf): zeros, not NaN
        probs = probs.nan_to_num(0.0)
    spec = next((e.redistribution for e in edits if e.redistribution is not None), None)
    if spec is not None:
        probs = _redistribute(probs.view(batch, num_heads, kv_len), spec, derived, layer).view(probs.shape)
    return probs


def probabilities(
    query: torch.Tensor, key: torch.Tensor, *, scaling: float, mask: torch.Tensor | None, derived: Derived
) -> torch.Tensor:
    """The unedited probabilities ``(B, H, T)`` in float32 of one query row (for statistics beside the
    model's own output)."""
    probs = _probabilities(query, key, scaling=scaling, mask=mask, edits=(), derived=derived, layer=0)
    return probs.view(query.shape[0], query.shape[1], key.shape[2])


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    mask: torch.Tensor | None,
    edits: Sequence[AttentionEdit],
    derived: Derived,
    layer: int = 0,
    want_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Edited attention of one query row (``fits``): ``query (B, H, 1, D)``, ``key``/``value``
    ``(B, H_kv, T, D)``, ``mask`` the model's (boolean, additive, or None: every key), ``layer`` the
    call's layer (what is made from per-layer edits is kept under it in ``derived``).

    Returns ``(output (B, 1, H, D) in the query's dtype, final probabilities (B, H, T) in float32)``,
    the probabilities None unless ``want_probs``."""
    batch, num_heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    probs = _probabilities(query, key, scaling=scaling, mask=mask, edits=edits, derived=derived, layer=layer)
    v = value.to(torch.float32).reshape(batch * kv_heads, kv_len, head_dim)
    out = torch.bmm(probs, v).view(batch, 1, num_heads, head_dim).to(query.dtype)
    return out, probs.view(batch, num_heads, kv_len) if want_probs else None
