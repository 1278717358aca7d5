"""The edited attention of a decode step in a few batched products: the CPU path for one query row.

For a call with one query row per batch row it computes what ``reference.reference_attention``
computes, in float32, with each product one batched matrix product over ``B * H_kv`` matrices (the
``G = H / H_kv`` query heads that share a key/value head are the rows of one matrix), and every
tensor made from the mask or an edit made once for all the calls that share it (``Derived``):

1. ``z = s q k^T + m`` in one ``baddbmm`` (``k^T`` one strided view of the keys), where ``m`` is the
   model's mask as an additive bias (0 where a key may be seen, ``-inf`` where not: the lowest finite
   float when a boost follows) plus the edits' key biases;
2. a key boost ``z += b |z|`` in one ``addcmul``, ``b`` zero on blocked keys so that they stay
   blocked (at most one boost, and no bias in an edit before it: the order of the reference);
3. ``a = softmax(z)`` (a decode row always sees its own key, so no row is fully masked);
4. a redistribution: the masses on four key columns ``C = [T, S, gate, rho * gate - gate & S]``
   (``T`` the target keys outside the source ``S``; ``rho`` taken at most 1, the largest share there
   is, so that every column stays finite below) in one product ``M = a C + (tiny, 0, c, c)``, read on
   the keys up to the last one any set holds (``P``: the image keys of a prompt, for VAR's sets kept
   for every step), so that a decode step reads and edits ``a[:P]`` alone. A row is selected when
   ``M >= (tiny+, -, g_min + c, c)`` (``tiny+`` the float after the smallest normal ``tiny``: the
   target holds some mass; then the gate's mass, and its source share ``M_{gate & S} <= rho M_gate``;
   the second column has no condition). The edited row is ``a' = a * (1 + w F^T)`` with the factor
   columns ``F = [(keep - 1) S, (1 - keep) T, 0, 0]`` and ``w = M / D``, ``D = M_T + tiny``, on
   selected rows (``[1, M_S / (M_T + tiny), ...]``), zeros elsewhere: source keys keep ``keep`` of
   their mass and target keys gain ``(1 - keep) M_S a_k / M_T``, the reference's ``redistribute``
   (which divides by ``max(M_T, tiny)``: the same number for any ``M_T`` above ``2^-102``, and finite
   below, where ``M_T`` is subnormal). A query mask folds into ``T``. The selection and ``D``:

   * with a gate minimum of at least ``1/16`` (VAR's is 0.2), or no gate, in one reduction: the
     gate's columns sit ``c = 1.5`` above their values, so that when met they stay above any target
     mass (at most 1), and the row's minimum of ``M`` where met, ``-inf`` where not (``+inf`` on the
     second column), is ``D`` on selected rows and ``-inf`` elsewhere (``w = M / D``: zeros; the
     gate's columns of ``w`` at most ``2.5 / tiny``, finite). The gate's conditions are then compared
     to within a float step of the shifted values (``2^-23`` below 2, ``2^-22`` above), at most
     ``2^-19`` of a selected row's gate mass (at least ``1/16``): the order of the rounding of the
     reference's own sums of a few hundred keys;
   * else (``c = 0``) exactly, as the reference: the rows whose columns all meet their bounds, and
     ``w = M / M_0`` on them (the shifted conditions would decide by rounding the rows whose gate
     holds almost nothing);

   the edit is made in place on ``a[:P]`` unless a gradient is asked for;
5. ``o = a' v``.

``fits`` says whether a call's edits have this form; anything else runs the reference. A method
that knows at the prompt the edit of its decode steps has what they derive from it made then
(``prepare``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch
from .derived import PER_LAYER, Derived
from .edits import AttentionEdit, Redistribution
from .reference import allowed_keys

_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32
_ABOVE_TINY = _TINY + 2.0**-149  # the next float32 up: a target mass above zero, plus tiny, is at least this
_ABOVE_ANY_MASS = 1.5  # the gate's columns' offset: met, they stay above the target's mass (module docstring)
_ONE_REDUCTION_GATE_MIN = 1.0 / 16  # the gate minimum from which the selection is one reduction (module docstring)


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
    """A per-key tensor ``(B|1, T)`` or ``(B|1, 1|H, T)`` laid out as ``(B * H_kv, G|1, T)`` beside the
    scores, or ``(1, 1, T)`` where it is the same for every row and head (it broadcasts)."""
    if t.dim() == 2:
        t = t[:, None]
    if t.shape[1] == 1:
        if t.shape[0] == 1:
            return t
        return t.repeat(batch // t.shape[0], kv_heads, 1).view(batch * kv_heads, 1, t.shape[-1])
    return t.expand(batch, num_heads, t.shape[-1]).reshape(batch * kv_heads, num_heads // kv_heads, t.shape[-1])


def _allowed(mask: torch.Tensor | None, derived: Derived) -> torch.Tensor | None:
    """The model's mask for one query row as booleans ``(B|1, 1|H, T)`` (True = may be seen), or None;
    made once for the calls that share the mask."""
    if mask is None:
        return None

    def make() -> torch.Tensor:
        allowed = allowed_keys(mask, True, 1, mask.shape[-1], mask.device)
        return allowed.reshape(allowed.shape[0], -1, allowed.shape[-1]) if allowed.dim() == 4 else allowed

    return derived.get("allowed", (mask,), make)


def _key_bias(mask, edits, shape, derived: Derived, device, boosted: bool) -> torch.Tensor | None:
    """The scores' additive term ``(B * H_kv, G|1, T)`` (``(1, 1, T)`` where every row shares it): the
    mask plus the key biases. A boosted call blocks with the lowest finite float (the boost reads
    ``|z|``, zero on blocked keys); others block with ``-inf``, so that a row whose biases block every
    key it may see gives zeros, as the reference."""
    biases = [e.key_bias for e in edits if e.key_bias is not None]
    if mask is None and not biases:
        return None

    def make() -> torch.Tensor:
        batch, num_heads, kv_heads = shape
        allowed = _allowed(mask, derived)
        if not biases and boosted:  # 0 where seen, the lowest float where blocked: one product
            return _as_matrices(allowed.logical_not() * torch.finfo(torch.float32).min, batch, num_heads, kv_heads)
        total = torch.zeros((), dtype=torch.float32, device=device) if not biases else 0.0
        for bias in biases:
            total = total + (bias[:, None] if bias.dim() == 2 else bias).to(torch.float32)
        if allowed is not None:
            total = torch.where(allowed, total, torch.finfo(torch.float32).min if boosted else -torch.inf)
        return _as_matrices(total, batch, num_heads, kv_heads)

    return derived.get("key bias", (mask, *biases), make, key=(shape, boosted))


def _key_boost(mask, boost: torch.Tensor, shape, derived: Derived) -> torch.Tensor:
    """The boost ``b`` as ``(B * H_kv, G|1, T)`` (``(1, 1, T)`` where every row shares it), zero on
    blocked keys."""

    def make() -> torch.Tensor:
        batch, num_heads, kv_heads = shape
        b = (boost[:, None] if boost.dim() == 2 else boost).to(torch.float32)
        allowed = _allowed(mask, derived)
        if allowed is not None:
            b = b * allowed
        return _as_matrices(b, batch, num_heads, kv_heads)

    return derived.get("key boost", (mask, boost), make, key=shape)


def _columns(spec: Redistribution, derived: Derived, layer: int, shape, *, search: bool) -> tuple[torch.Tensor, ...]:
    """The mass columns ``C (B * H_kv, P, 4)``, the factor columns ``F^T (B * H_kv, 4, P)``, the masses'
    offset, the selection's lower bounds, and what stands for a column that fails them where the
    selection is one reduction (else None; module docstring, step 4). With ``search`` (sets kept longer
    than the call's keys, for the steps after), ``P`` is the extent of the sets: the keys up to the
    last one any set holds, found once (it reads one number), so that a call reads only the
    probabilities of those keys; else ``P`` is the sets' length. Kept per layer: a method's sets may
    differ from layer to layer and stay the same from step to step."""

    def make():
        def flat(t):
            return (t[:, 0] if t.dim() == 3 else t).to(torch.float32)

        batch, _, kv_heads = shape
        source = flat(spec.source)
        target = flat(spec.target) * (1.0 - source)
        if spec.query_mask is not None:  # an ineligible row has no target mass, so it is never selected
            target = target * spec.query_mask[:, -1:].to(torch.float32)
        zeros = torch.zeros_like(source)
        if spec.gate is not None:
            gate = flat(spec.gate)
            share = min(spec.gate_max_source_share, 1.0)  # a share above 1 bounds nothing: kept finite over D
            gate_terms, gate_lower = [gate, share * gate - gate * source], spec.gate_min_mass
        else:
            gate_terms, gate_lower = [zeros, zeros], 0.0
        columns = torch.stack([target, source, *gate_terms], dim=-1)
        factors = torch.stack([(spec.keep - 1.0) * source, (1.0 - spec.keep) * target, zeros, zeros], dim=1)
        extent = _extent(columns) if search else columns.shape[1]

        def per_head(t):  # (B|1, ...) -> (B * H_kv, ...), row b * H_kv + h
            return t.expand(batch, *t.shape[1:]).repeat_interleave(kv_heads, dim=0)

        one_reduction = spec.gate is None or spec.gate_min_mass >= _ONE_REDUCTION_GATE_MIN
        device, clear = source.device, _ABOVE_ANY_MASS if one_reduction else 0.0
        offset = torch.tensor([_TINY, 0.0, clear, clear], device=device).view(1, 1, 4)
        no_bound = torch.inf if one_reduction else -torch.inf  # the second column: never met, or always
        lower = torch.tensor([_ABOVE_TINY, no_bound, gate_lower + clear, clear], device=device)
        failed = torch.tensor([-torch.inf, torch.inf, -torch.inf, -torch.inf], device=device) if one_reduction else None
        return per_head(columns[:, :extent]), per_head(factors[..., :extent]), offset, lower, failed

    sources = (spec.source, spec.target, spec.gate, spec.query_mask)
    settings = (layer, shape, search, spec.keep, spec.gate_min_mass, spec.gate_max_source_share)
    return derived.get("redistribution", sources, make, key=settings, keep=PER_LAYER)


def _extent(columns: torch.Tensor) -> int:
    """How many leading keys of ``columns (B, T, 4)`` reach the last key any column holds (0: none)."""
    held = columns.ne(0).any(-1).any(0).nonzero()
    return int(held[-1]) + 1 if len(held) else 0


def _redistribute(probs: torch.Tensor, spec: Redistribution, derived: Derived, layer: int, shape) -> torch.Tensor:
    """Step 4 on ``probs (B * H_kv, G, T)``, read and edited on the keys of the sets' extent only (in
    place where no gradient is asked for)."""
    kv_len = probs.shape[-1]
    columns, factors, offset, lower, failed = _columns(
        spec, derived, layer, shape, search=spec.source.shape[-1] > kv_len
    )
    if columns.shape[1] == 0:  # no set holds a key: no row is ever selected
        return probs
    if columns.shape[1] > kv_len:  # sets holding keys past the call's
        columns, factors = columns[:, :kv_len], factors[..., :kv_len]
    extent = columns.shape[1]
    head = probs if extent == kv_len else probs[..., :extent]
    masses = torch.baddbmm(offset, head, columns)  # (B * H_kv, G, 4), the target's mass plus tiny first
    if failed is not None:  # M_T + tiny where every condition is met, else -inf, whose quotients are zeros
        weights = masses / torch.where(masses >= lower, masses, failed).amin(-1, keepdim=True)
    else:
        selected = (masses >= lower).all(-1, keepdim=True)
        weights = torch.where(selected, masses / masses[..., :1], _constant(derived, probs.device, 0.0))
    factor = torch.baddbmm(_constant(derived, probs.device, 1.0), weights, factors)
    if not (torch.is_grad_enabled() and probs.requires_grad):
        head.mul_(factor)
        return probs
    edited = head * factor
    return edited if extent == kv_len else torch.cat([edited, probs[..., extent:]], dim=-1)


def _constant(derived: Derived, device: torch.device, value: float) -> torch.Tensor:
    """``value`` as a float32 ``(1, 1, 1)`` tensor on ``device``, made once."""
    return derived.get("constant", (), lambda: torch.full((1, 1, 1), value, device=device), key=(value, device))


def _keys_transposed(key: torch.Tensor) -> torch.Tensor:
    """``key (B, H_kv, T, D)`` as ``(B * H_kv, D, T)``: one strided view where its batch and head
    dimensions merge (a cache's keys do), else a reshape and a transpose."""
    batch, kv_heads, kv_len, head_dim = key.shape
    stride_b, stride_h, stride_t, stride_d = key.stride()
    if batch == 1 or stride_b == kv_heads * stride_h:
        size, stride = (batch * kv_heads, head_dim, kv_len), (stride_h, stride_d, stride_t)
        return key.as_strided(size, stride, key.storage_offset())
    return key.reshape(batch * kv_heads, kv_len, head_dim).transpose(1, 2)


def _probabilities(query, key, *, scaling, mask, edits, derived, layer) -> torch.Tensor:
    """Steps 1-4 of the module docstring: the final probabilities ``(B * H_kv, G, T)``."""
    batch, num_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads")
    shape = (batch, num_heads, kv_heads)
    q = query.to(torch.float32).reshape(batch * kv_heads, num_heads // kv_heads, head_dim)
    k_t = _keys_transposed(key.to(torch.float32))
    boost = next((e.key_boost for e in edits if e.key_boost is not None), None)
    biases = any(e.key_bias is not None for e in edits)
    bias = _key_bias(mask, edits, shape, derived, query.device, boosted=boost is not None)
    if bias is None:
        scores = torch.baddbmm(_constant(derived, q.device, 0.0), q, k_t, beta=0.0, alpha=scaling)
    else:
        scores = torch.baddbmm(bias, q, k_t, alpha=scaling)
    if boost is not None:
        scores = torch.addcmul(scores, scores.abs(), _key_boost(mask, boost, shape, derived))
    probs = torch.softmax(scores, dim=-1)
    if biases:  # a key bias may block every key of a row (-inf): zeros, not NaN
        probs = probs.nan_to_num(0.0)
    spec = next((e.redistribution for e in edits if e.redistribution is not None), None)
    if spec is not None:
        probs = _redistribute(probs, spec, derived, layer, shape)
    return probs


def probabilities(
    query: torch.Tensor, key: torch.Tensor, *, scaling: float, mask: torch.Tensor | None, derived: Derived
) -> torch.Tensor:
    """The unedited probabilities ``(B, H, T)`` in float32 of one query row (for statistics beside the
    model's own output)."""
    probs = _probabilities(query, key, scaling=scaling, mask=mask, edits=(), derived=derived, layer=0)
    return probs.view(query.shape[0], query.shape[1], key.shape[2])


def prepare(
    edit: AttentionEdit,
    derived: Derived,
    *,
    layer: int,
    batch: int,
    num_heads: int,
    kv_heads: int,
    device: torch.device,
) -> None:
    """Make now what the decode steps of ``layer`` will derive from ``edit`` (a redistribution's columns,
    step 4), for a method that knows at the prompt the edit its decode steps will use: so that no
    decode step makes it. Nothing where the Triton kernel serves those steps, which derives its own."""
    if edit.redistribution is not None and not dispatch.use_kernel(device):
        _columns(edit.redistribution, derived, layer, (batch, num_heads, kv_heads), search=True)
        for value in (0.0, 1.0):  # the scores' zero (no mask) and the factor's one
            _constant(derived, device, value)


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
