"""Decode attention with halluguard's edits and statistics, in one pass over the KV cache.

The op computes, for a few query rows per batch row (``R``: 1 at decode, OPERA's candidates side by
side, or the last prompt row), attention over the whole KV cache in the HF layout, with grouped-query
attention read in place (query head ``h`` reads key/value head ``h // (H / Hkv)``; K and V are never
repeated). Per batch row ``b``, query row ``r``, head ``h`` and key ``j``, in float32:

1. ``z_j = scaling * <q, k_j>``; soft-capped when asked: ``z_j = c * tanh(z_j / c)``;
2. ``z_j += boost_j * |z_j|`` (PAI's amplification), then ``z_j += bias_j``;
3. keys the mask forbids get ``z_j = -inf``; ``p = softmax(z)`` (a row with no allowed key is all 0);
4. redistribution (VAR): keys split into source ``S``, target ``T`` (target minus source) and the
   rest ``O``. From the masses ``M_S, M_T`` and the gate masses ``M_G = sum_gate p``,
   ``M_GS = sum_{gate and S} p``, a query is selected when it is eligible, ``M_T > 0``,
   ``M_G >= gate_min_mass`` and ``M_GS <= gate_max_source_share * M_G``; then
   ``a_j = f_S p_j`` on ``S``, ``f_T p_j`` on ``T`` and ``p_j`` on ``O``, with ``f_S = keep`` and
   ``f_T = 1 + (1 - keep) M_S / M_T`` (``f = 1`` when not selected): row sums stay 1;
5. ``o = sum_j a_j v_j = f_S O_S + f_T O_T + O_O``, from the three partial outputs ``O_X`` kept
   apart during the pass, then ``o *= head_scale[b, h]``.

Statistics come from the same pass, on the final ``a``:

* group masses ``mass[b, r, h, g] = sum_j a_j w_gj`` for key weights ``w (B, G, T)`` (a 0/1 key set
  gives its mass, ``1 / size`` its mean): ``f_S W_gS + f_T W_gT + W_gO`` from partial sums;
* the head-max row ``max_h a_j`` and the head-mean row ``mean_h a_j`` over the keys, per query row:
  a second, optional kernel recomputes the scores of each key once the final normaliser and factors
  are known (no attention row is stored by the main pass). OPERA needs it in one layer, AvisC once.

Splitting (FlashDecoding): the keys are cut into ``num_splits`` contiguous ranges, each program keeps
a running maximum ``m``, a running sum ``l`` and its partial sums relative to ``m`` (online softmax,
block by block), and a merge kernel combines the splits under the shared normaliser
``m = max_s m_s``, ``l = sum_s exp(m_s - m) l_s`` before applying the redistribution, which needs the
whole row's masses. Compile-time flags remove every unused feature from the compiled kernels.

Shapes and dtypes: ``query (B, H, R, D)``, ``key``/``value (B, Hkv, T, D)`` in float32, float16 or
bfloat16 (the last dimension contiguous); accumulation in float32; the output ``(B, R, H, D)`` (the
transformers attention interface's layout) in the query's dtype. ``halluguard.attention.reference``
holds the same operation in PyTorch (``fused_attention_reference``, the same signature): the CPU
path and the oracle of the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from ._compat import cdiv, interpreting, next_power_of_2, require_triton, tl, triton

NEG = tl.constexpr(-1.0e30)  # the running maximum's start: exp(-inf - NEG) is 0, exp(NEG - NEG) is 1, no NaN


@triton.jit
def _block_scores(
    q,
    K,
    stride_kt,
    offs_t,
    key_ok,
    offs_d,
    D,
    heads,
    head_ok,
    b,
    r,
    first_row,
    Mask,
    stride_mb,
    stride_mr,
    stride_mt,
    Boost,
    stride_xb,
    stride_xh,
    stride_xt,
    Bias,
    stride_yb,
    stride_yh,
    stride_yt,
    scaling,
    softcap,
    SOFTCAP: tl.constexpr,
    DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BOOST: tl.constexpr,
    BIAS: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Steps 1-3 for one block of keys: the edited scores ``(BLOCK_G, BLOCK_T)``, -inf where not allowed."""
    k = tl.load(
        K + offs_t[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0
    )
    if DOT_F32:
        z = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scaling
    elif DOT:  # q in the cache's dtype: tensor cores, float32 accumulation (float32 inputs: exact "ieee" products)
        z = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    else:
        z = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scaling
    if SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    both = head_ok[:, None] & key_ok[None, :]
    if BOOST:
        boost = tl.load(
            Boost + b * stride_xb + heads[:, None] * stride_xh + offs_t[None, :] * stride_xt, mask=both, other=0.0
        )
        z = z + boost * tl.abs(z)
    if BIAS:
        z = z + tl.load(
            Bias + b * stride_yb + heads[:, None] * stride_yh + offs_t[None, :] * stride_yt, mask=both, other=0.0
        )
    allowed = both
    if MASK:
        seen = tl.load(Mask + b * stride_mb + r * stride_mr + offs_t * stride_mt, mask=key_ok, other=0)
        allowed = allowed & (seen != 0)[None, :]
    if CAUSAL:
        allowed = allowed & (offs_t <= first_row + r)[None, :]
    return tl.where(allowed, z, float("-inf"))


@triton.jit
def _weighted_values(p, v, DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """``sum_j p[g, j] v[j, :]`` for a block: ``(BLOCK_G, BLOCK_D)`` in float32. With ``DOT`` the
    probabilities are rounded to the cache's dtype for the tensor cores, as FlashAttention does;
    ``DOT_F32`` keeps float32 operands (the interpreter, whose bfloat16 products are wrong)."""
    if DOT_F32:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    if DOT:
        return tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _key_sets(
    Src,
    stride_sb,
    stride_sh,
    stride_st,
    Tgt,
    stride_tb,
    stride_tt,
    b,
    heads,
    head_ok,
    offs_t,
    key_ok,
):
    """The redistribution's source keys (per head) and target keys minus the source, ``(BLOCK_G, BLOCK_T)``."""
    both = head_ok[:, None] & key_ok[None, :]
    src = tl.load(Src + b * stride_sb + heads[:, None] * stride_sh + offs_t[None, :] * stride_st, mask=both, other=0)
    tgt = tl.load(Tgt + b * stride_tb + offs_t * stride_tt, mask=key_ok, other=0)
    src = src != 0
    return src, (tgt != 0)[None, :] & (~src)


@triton.jit
def _partials_kernel(
    Q,
    stride_qb,
    stride_qh,
    stride_qr,
    K,
    stride_kb,
    stride_kh,
    stride_kt,
    V,
    stride_vb,
    stride_vh,
    stride_vt,
    Mask,
    stride_mb,
    stride_mr,
    stride_mt,
    Boost,
    stride_xb,
    stride_xh,
    stride_xt,
    Bias,
    stride_yb,
    stride_yh,
    stride_yt,
    Src,
    stride_sb,
    stride_sh,
    stride_st,
    Tgt,
    stride_tb,
    stride_tt,
    Gate,
    stride_gb,
    stride_gt,
    W,
    stride_wb,
    stride_wg,
    stride_wt,
    PartM,
    PartL,
    PartAcc,
    PartMass,
    PartW,
    R,
    H,
    G,
    T,
    D,
    NG,
    first_row,
    keys_per_split,
    scaling,
    softcap,
    NUM_SPLITS: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_NG: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BOOST: tl.constexpr,
    BIAS: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    REDISTRIBUTE: tl.constexpr,
    GATE: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """One program per (batch row x query row, key/value head, split): the split's partial sums for
    the query heads that share the key/value head."""
    br = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = br // R
    r = br % R
    offs_g = tl.arange(0, BLOCK_G)
    head_ok = offs_g < G
    heads = kvh * G + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + r * stride_qr + offs_d[None, :],
        mask=head_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if not DOT:
        q = q.to(tl.float32)
    K = K + b * stride_kb + kvh * stride_kh
    V = V + b * stride_vb + kvh * stride_vh

    m = tl.full([BLOCK_G], NEG, tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc_o = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    acc_s = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    acc_t = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    mass_s = tl.zeros([BLOCK_G], tl.float32)
    mass_t = tl.zeros([BLOCK_G], tl.float32)
    mass_g = tl.zeros([BLOCK_G], tl.float32)
    mass_gs = tl.zeros([BLOCK_G], tl.float32)
    w_o = tl.zeros([BLOCK_G, BLOCK_NG], tl.float32)
    w_s = tl.zeros([BLOCK_G, BLOCK_NG], tl.float32)
    w_t = tl.zeros([BLOCK_G, BLOCK_NG], tl.float32)
    offs_ng = tl.arange(0, BLOCK_NG)

    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, T)
    for first in range(start, stop, BLOCK_T):
        offs_t = first + tl.arange(0, BLOCK_T)
        key_ok = offs_t < stop
        z = _block_scores(
            q, K, stride_kt, offs_t, key_ok, offs_d, D, heads, head_ok, b, r, first_row,
            Mask, stride_mb, stride_mr, stride_mt, Boost, stride_xb, stride_xh, stride_xt,
            Bias, stride_yb, stride_yh, stride_yt, scaling, softcap,
            SOFTCAP, DOT, DOT_F32, BOOST, BIAS, MASK, CAUSAL,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_t[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if REDISTRIBUTE:
            src, tgt = _key_sets(
                Src, stride_sb, stride_sh, stride_st, Tgt, stride_tb, stride_tt, b, heads, head_ok, offs_t, key_ok
            )
            p_s = tl.where(src, p, 0.0)
            p_t = tl.where(tgt, p, 0.0)
            p_o = tl.where(src | tgt, 0.0, p)
            acc_s = acc_s * alpha[:, None] + _weighted_values(p_s, v, DOT, DOT_F32)
            acc_t = acc_t * alpha[:, None] + _weighted_values(p_t, v, DOT, DOT_F32)
            acc_o = acc_o * alpha[:, None] + _weighted_values(p_o, v, DOT, DOT_F32)
            mass_s = mass_s * alpha + tl.sum(p_s, axis=1)
            mass_t = mass_t * alpha + tl.sum(p_t, axis=1)
            if GATE:
                gate = tl.load(Gate + b * stride_gb + offs_t * stride_gt, mask=key_ok, other=0) != 0
                mass_g = mass_g * alpha + tl.sum(tl.where(gate[None, :], p, 0.0), axis=1)
                mass_gs = mass_gs * alpha + tl.sum(tl.where(gate[None, :], p_s, 0.0), axis=1)
        else:
            p_o = p
            acc_o = acc_o * alpha[:, None] + _weighted_values(p, v, DOT, DOT_F32)
        if GROUPS:
            w = tl.load(
                W + b * stride_wb + offs_ng[:, None] * stride_wg + offs_t[None, :] * stride_wt,
                mask=(offs_ng[:, None] < NG) & key_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            w_o = w_o * alpha[:, None] + tl.sum(p_o[:, None, :] * w[None, :, :], axis=2)
            if REDISTRIBUTE:
                w_s = w_s * alpha[:, None] + tl.sum(p_s[:, None, :] * w[None, :, :], axis=2)
                w_t = w_t * alpha[:, None] + tl.sum(p_t[:, None, :] * w[None, :, :], axis=2)
        m = m_new

    slot = (br * H + heads) * NUM_SPLITS + split  # (BLOCK_G,) index of this split's partials
    tl.store(PartM + slot, m, mask=head_ok)
    tl.store(PartL + slot, total, mask=head_ok)
    acc_at = PartAcc + slot[:, None] * (PARTS * D) + offs_d[None, :]
    stored = head_ok[:, None] & d_ok[None, :]
    tl.store(acc_at, acc_o, mask=stored)
    if REDISTRIBUTE:
        tl.store(acc_at + D, acc_s, mask=stored)
        tl.store(acc_at + 2 * D, acc_t, mask=stored)
        tl.store(PartMass + slot * 4, mass_s, mask=head_ok)
        tl.store(PartMass + slot * 4 + 1, mass_t, mask=head_ok)
        tl.store(PartMass + slot * 4 + 2, mass_g, mask=head_ok)
        tl.store(PartMass + slot * 4 + 3, mass_gs, mask=head_ok)
    if GROUPS:
        w_at = PartW + slot[:, None] * (PARTS * NG) + offs_ng[None, :]
        w_ok = head_ok[:, None] & (offs_ng[None, :] < NG)
        tl.store(w_at, w_o, mask=w_ok)
        if REDISTRIBUTE:
            tl.store(w_at + NG, w_s, mask=w_ok)
            tl.store(w_at + 2 * NG, w_t, mask=w_ok)


@triton.jit
def _combine(
    Part, slot, weight, inv, width, offs_x, x_ok, s_ok, PARTS: tl.constexpr, part: tl.constexpr, BLOCK_X: tl.constexpr
):
    """``sum_s weight_s * Part[slot_s, part, :] * inv`` over the splits: ``(BLOCK_G, BLOCK_X)``."""
    x = tl.load(
        Part + slot[:, :, None] * (PARTS * width) + part * width + offs_x[None, None, :],
        mask=s_ok[:, :, None] & x_ok[None, None, :],
        other=0.0,
    )
    return tl.sum(weight[:, :, None] * x, axis=1) * inv[:, None]


@triton.jit
def _merge_kernel(
    PartM,
    PartL,
    PartAcc,
    PartMass,
    PartW,
    Out,
    stride_ob,
    stride_or,
    stride_oh,
    HeadScale,
    stride_hb,
    stride_hh,
    Eligible,
    stride_eb,
    stride_er,
    Mass,
    Final,
    R,
    H,
    G,
    D,
    NG,
    keep,
    gate_min_mass,
    gate_max_source_share,
    NUM_SPLITS: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_NG: tl.constexpr,
    REDISTRIBUTE: tl.constexpr,
    GATE: tl.constexpr,
    ELIGIBLE: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_SCALE: tl.constexpr,
):
    """One program per (batch row x query row, group of ``G`` query heads; the launcher uses one
    head): the splits merged under the shared normaliser, the redistribution's factors, the output
    and the group masses."""
    br = tl.program_id(0)
    first = tl.program_id(1)
    b = br // R
    r = br % R
    offs_g = tl.arange(0, BLOCK_G)
    head_ok = offs_g < G
    heads = first * G + offs_g
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = head_ok[:, None] & (offs_s < NUM_SPLITS)[None, :]
    slot = (br * H + heads)[:, None] * NUM_SPLITS + offs_s[None, :]  # (BLOCK_G, BLOCK_S)
    m_s = tl.load(PartM + slot, mask=s_ok, other=NEG)
    m = tl.max(m_s, axis=1)
    weight = tl.where(s_ok, tl.exp(m_s - m[:, None]), 0.0)
    total = tl.sum(weight * tl.load(PartL + slot, mask=s_ok, other=0.0), axis=1)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    out = _combine(PartAcc, slot, weight, inv, D, offs_d, d_ok, s_ok, PARTS, 0, BLOCK_D)
    f_s = tl.full([BLOCK_G], 1.0, tl.float32)
    f_t = tl.full([BLOCK_G], 1.0, tl.float32)
    if REDISTRIBUTE:
        masses = tl.load(
            PartMass + slot[:, :, None] * 4 + tl.arange(0, 4)[None, None, :], mask=s_ok[:, :, None], other=0.0
        )
        masses = tl.sum(weight[:, :, None] * masses, axis=1) * inv[:, None]  # (BLOCK_G, 4): S, T, gate, gate & S
        pick = tl.arange(0, 4)[None, :]
        m_src = tl.sum(tl.where(pick == 0, masses, 0.0), axis=1)
        m_tgt = tl.sum(tl.where(pick == 1, masses, 0.0), axis=1)
        selected = m_tgt > 0
        if GATE:
            m_gate = tl.sum(tl.where(pick == 2, masses, 0.0), axis=1)
            m_gate_src = tl.sum(tl.where(pick == 3, masses, 0.0), axis=1)
            selected = selected & (m_gate >= gate_min_mass) & (m_gate_src <= gate_max_source_share * m_gate)
        if ELIGIBLE:
            selected = selected & (tl.load(Eligible + b * stride_eb + r * stride_er) != 0)
        f_s = tl.where(selected, keep, 1.0)
        m_tgt = tl.maximum(m_tgt, 1.1754943508222875e-38)  # the reference's clamp: finfo(float32).tiny
        f_t = tl.where(selected, 1.0 + (1.0 - keep) * m_src / m_tgt, 1.0)
        out_s = _combine(PartAcc, slot, weight, inv, D, offs_d, d_ok, s_ok, PARTS, 1, BLOCK_D)
        out_t = _combine(PartAcc, slot, weight, inv, D, offs_d, d_ok, s_ok, PARTS, 2, BLOCK_D)
        out = out + f_s[:, None] * out_s + f_t[:, None] * out_t
    if HEAD_SCALE:
        out = out * tl.load(HeadScale + b * stride_hb + heads * stride_hh, mask=head_ok, other=1.0)[:, None]
    tl.store(
        Out + b * stride_ob + r * stride_or + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=head_ok[:, None] & d_ok[None, :],
    )
    if GROUPS:
        offs_ng = tl.arange(0, BLOCK_NG)
        ng_ok = offs_ng < NG
        mass = _combine(PartW, slot, weight, inv, NG, offs_ng, ng_ok, s_ok, PARTS, 0, BLOCK_NG)
        if REDISTRIBUTE:
            mass_s = _combine(PartW, slot, weight, inv, NG, offs_ng, ng_ok, s_ok, PARTS, 1, BLOCK_NG)
            mass_t = _combine(PartW, slot, weight, inv, NG, offs_ng, ng_ok, s_ok, PARTS, 2, BLOCK_NG)
            mass = mass + f_s[:, None] * mass_s + f_t[:, None] * mass_t
        tl.store(Mass + (br * H + heads)[:, None] * NG + offs_ng[None, :], mass, mask=head_ok[:, None] & ng_ok[None, :])
    final = (br * H + heads) * 4
    tl.store(Final + final, m, mask=head_ok)
    tl.store(Final + final + 1, inv, mask=head_ok)
    tl.store(Final + final + 2, f_s, mask=head_ok)
    tl.store(Final + final + 3, f_t, mask=head_ok)


@triton.jit
def _rows_kernel(
    Q,
    stride_qb,
    stride_qh,
    stride_qr,
    K,
    stride_kb,
    stride_kh,
    stride_kt,
    Mask,
    stride_mb,
    stride_mr,
    stride_mt,
    Boost,
    stride_xb,
    stride_xh,
    stride_xt,
    Bias,
    stride_yb,
    stride_yh,
    stride_yt,
    Src,
    stride_sb,
    stride_sh,
    stride_st,
    Tgt,
    stride_tb,
    stride_tt,
    Final,
    HeadMax,
    HeadMean,
    R,
    H,
    HKV,
    G,
    T,
    D,
    first_row,
    scaling,
    softcap,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BOOST: tl.constexpr,
    BIAS: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    REDISTRIBUTE: tl.constexpr,
):
    """One program per (batch row x query row, block of keys): ``max_h a_j`` and ``sum_h a_j / H``
    from the scores recomputed with the merged normaliser and factors (``Final``)."""
    br = tl.program_id(0)
    b = br // R
    r = br % R
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    key_ok = offs_t < T
    offs_g = tl.arange(0, BLOCK_G)
    head_ok = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    best = tl.zeros([BLOCK_T], tl.float32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for kvh in range(0, HKV):
        heads = kvh * G + offs_g
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + r * stride_qr + offs_d[None, :],
            mask=head_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if not DOT:
            q = q.to(tl.float32)
        z = _block_scores(
            q, K + b * stride_kb + kvh * stride_kh, stride_kt, offs_t, key_ok, offs_d, D, heads, head_ok, b, r,
            first_row, Mask, stride_mb, stride_mr, stride_mt, Boost, stride_xb, stride_xh, stride_xt,
            Bias, stride_yb, stride_yh, stride_yt, scaling, softcap,
            SOFTCAP, DOT, DOT_F32, BOOST, BIAS, MASK, CAUSAL,
        )  # fmt: skip
        final = (br * H + heads) * 4
        m = tl.load(Final + final, mask=head_ok, other=0.0)
        inv = tl.load(Final + final + 1, mask=head_ok, other=0.0)
        a = tl.exp(z - m[:, None]) * inv[:, None]
        if REDISTRIBUTE:
            src, tgt = _key_sets(
                Src, stride_sb, stride_sh, stride_st, Tgt, stride_tb, stride_tt, b, heads, head_ok, offs_t, key_ok
            )
            f_s = tl.load(Final + final + 2, mask=head_ok, other=1.0)
            f_t = tl.load(Final + final + 3, mask=head_ok, other=1.0)
            a = tl.where(src, a * f_s[:, None], tl.where(tgt, a * f_t[:, None], a))
        a = tl.where(head_ok[:, None], a, 0.0)
        best = tl.maximum(best, tl.max(a, axis=0))
        total = total + tl.sum(a, axis=0)
    tl.store(HeadMax + br * T + offs_t, best, mask=key_ok)
    tl.store(HeadMean + br * T + offs_t, total / H, mask=key_ok)


# ---- launcher ---------------------------------------------------------------------------------------------


KERNELS = (_partials_kernel, _merge_kernel, _rows_kernel)  # every kernel this module launches


@contextlib.contextmanager
def counting_launches() -> Iterator[list[int]]:
    """While the block runs, ``[n]``: the launches of this module's kernels so far, counted by each
    kernel's pre-run hooks (on a GPU and under the interpreter alike; none without Triton)."""
    launches = [0]

    def count(*args, **kwargs) -> None:
        launches[0] += 1

    hooked = [k for k in KERNELS if hasattr(k, "add_pre_run_hook")]
    for kernel in hooked:
        kernel.add_pre_run_hook(count)
    try:
        yield launches
    finally:
        for kernel in hooked:
            kernel.pre_run_hooks.remove(count)


def _per_key(t: torch.Tensor | None, num_heads: int) -> torch.Tensor | None:
    """A per-key edit ``(B, T)`` or ``(B, H|1, T)`` as ``(B, H, T)``, per-row ones with head stride 0."""
    if t is None:
        return None
    if t.dim() == 2:
        t = t[:, None]
    if t.dim() != 3 or t.shape[1] not in (1, num_heads):
        raise ValueError(f"per-key tensor must be (B, T) or (B, H, T), got {tuple(t.shape)}")
    return t.expand(-1, num_heads, -1)


def _operand(t: torch.Tensor | None, fallback: torch.Tensor, dims: int) -> tuple:
    """A tensor and its strides as kernel arguments; an absent one is ``fallback`` with zero strides
    (its flag keeps the kernel from reading it)."""
    return (fallback, *(0,) * dims) if t is None else (t, *t.stride())


def _default_splits(programs: int, blocks: int, device: torch.device) -> int:
    """Enough programs to hide memory latency (about eight per streaming multiprocessor: on an H100
    this ran 1.5-2x faster than two per multiprocessor), never more splits than key blocks; one split
    under the interpreter, where programs run one by one."""
    if device.type != "cuda":
        return 1
    target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, cdiv(target, max(programs, 1)), 128))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The sizes of one call and how its heads and keys are cut into blocks and splits."""

    bsz: int
    num_heads: int
    num_rows: int
    head_dim: int
    kv_heads: int
    kv_len: int
    group: int  # query heads per key/value head
    dot: bool  # tensor-core products for the query heads of a group (group > 1)
    block_g: int
    block_d: int
    block_t: int
    splits: int
    keys_per_split: int
    first_row: int
    interpreted_bf16: bool  # bfloat16 under the interpreter: float32 products, output rounded by torch

    @property
    def rows(self) -> int:
        """Batch rows times query rows: the first grid dimension of every kernel."""
        return self.bsz * self.num_rows


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The optional inputs on the query's device in the kernels' dtypes (None where absent), and the
    per-key kernel arguments both passes read."""

    placeholder: torch.Tensor  # stands for absent inputs: their flags keep them unread
    redistribution: object | None
    allowed: torch.Tensor | None
    gate: torch.Tensor | None
    eligible: torch.Tensor | None
    weights: torch.Tensor | None
    scale: torch.Tensor | None
    key_inputs: tuple  # mask, boost, bias, source and target of a redistribution, with their strides

    @property
    def num_groups(self) -> int:
        """``NG``, the number of key-weight groups (0 without ``group_weights``)."""
        return 0 if self.weights is None else self.weights.shape[1]

    @property
    def parts(self) -> int:
        """Partial outputs kept per split: ``O_O, O_S, O_T`` with a redistribution, else ``O`` alone."""
        return 3 if self.redistribution is not None else 1


@dataclasses.dataclass(frozen=True)
class _Buffers:
    """The float32 partials of every split, the output and the merged results the last pass reads."""

    part_m: torch.Tensor  # (B*R, H, S): running maximum of each split
    part_l: torch.Tensor  # (B*R, H, S): running sum of each split
    part_acc: torch.Tensor  # (B*R, H, S, PARTS, D): partial outputs
    part_mass: torch.Tensor  # (B*R, H, S, 4): masses M_S, M_T, M_G, M_GS (placeholder without redistribution)
    part_w: torch.Tensor  # (B*R, H, S, PARTS, NG): group sums (placeholder without group weights)
    out: torch.Tensor  # (B, R, H, D)
    mass: torch.Tensor  # (B*R, H, max(NG, 1))
    final: torch.Tensor  # (B*R, H, 4): merged maximum, 1 / sum, f_S and f_T


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the query heads share the key/value heads evenly (``H % Hkv == 0``)
    and query, key and value have a contiguous last dimension."""
    num_heads, kv_heads = query.shape[1], key.shape[1]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("query, key and value need a contiguous last (head) dimension")


def _default_block_t(dot: bool, block_d: int) -> int:
    """Keys per block: 64 for tensor-core products, else about ``8192 / BLOCK_D`` (16 to 64) so a
    block of keys stays a fixed number of elements."""
    return 64 if dot else max(16, min(64, next_power_of_2(max(8192 // block_d, 1))))


def _key_splits(
    programs: int, kv_len: int, block_t: int, num_splits: int | None, device: torch.device
) -> tuple[int, int]:
    """The number of key ranges and the keys per range: ``num_splits`` (default ``_default_splits``)
    capped at the number of key blocks, each range whole blocks, then as many ranges as cover the
    keys (``ceil(T / keys_per_split)``), so that no range is left empty."""
    blocks = cdiv(max(kv_len, 1), block_t)
    splits = max(1, min(num_splits or _default_splits(programs, blocks, device), blocks))
    keys_per_split = cdiv(blocks, splits) * block_t
    return cdiv(max(kv_len, 1), keys_per_split), keys_per_split


def _plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    first_row: int | None,
    num_splits: int | None,
    block_t: int | None,
    workspace=None,
) -> _Plan:
    """Check the inputs (at every call: strides may change while shapes do not) and choose the blocks
    and splits of the call, once per shape and setting while ``workspace`` keeps the choice."""
    _check_inputs(query, key, value)
    choose = lambda: _choose(query, key, first_row, num_splits, block_t)
    if workspace is None:
        return choose()
    shapes = (query.shape, key.shape[1:3], query.dtype, query.device, first_row, num_splits, block_t, interpreting())
    return workspace.get("kernel plan", (), choose, key=shapes)


def _choose(
    query: torch.Tensor, key: torch.Tensor, first_row: int | None, num_splits: int | None, block_t: int | None
) -> _Plan:
    """The blocks and splits of a call of these shapes."""
    bsz, num_heads, num_rows, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = num_heads // kv_heads
    # query heads sharing a key/value head go through tensor-core products, padded to 16 rows
    dot = group > 1
    block_d = next_power_of_2(head_dim)
    block_t = _default_block_t(dot, block_d) if block_t is None else block_t
    splits, keys_per_split = _key_splits(bsz * num_rows * kv_heads, kv_len, block_t, num_splits, query.device)
    return _Plan(
        bsz=bsz,
        num_heads=num_heads,
        num_rows=num_rows,
        head_dim=head_dim,
        kv_heads=kv_heads,
        kv_len=kv_len,
        group=group,
        dot=dot,
        block_g=max(16, next_power_of_2(group)) if dot else 1,
        block_d=block_d,
        block_t=block_t,
        splits=splits,
        keys_per_split=keys_per_split,
        first_row=kv_len - num_rows if first_row is None else first_row,
        # the interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even) and gets bfloat16
        # products wrong: there the output is rounded by torch and the products take float32 operands
        interpreted_bf16=interpreting() and query.dtype == torch.bfloat16,
    )


def _as_float(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``t`` as float32 on ``device``; None stays None."""
    return None if t is None else t.to(device, torch.float32)


def _as_flag(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``t`` as int8 flags (0 or not) on ``device``; None stays None."""
    return None if t is None else t.to(device, torch.int8)


def _kept(workspace, name: str, source: torch.Tensor | None, make, key=None, per_layer=False) -> torch.Tensor | None:
    """``make()``, or the value ``workspace`` (``get(name, sources, make, key, keep)``) keeps for this very
    ``source`` and an equal ``key``; None for no source. The redistribution's sets may differ from layer
    to layer (``per_layer``: the workspace keeps ``workspace.per_layer`` of them); the mask and the
    per-key edits are shared by a forward's layers."""
    if source is None:
        return None
    if workspace is None:
        return make()
    return workspace.get(name, (source,), make, key=key, keep=workspace.per_layer if per_layer else None)


def _prepare_inputs(
    query: torch.Tensor,
    plan: _Plan,
    allowed: torch.Tensor | None,
    key_boost: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    spec,
    head_scale: torch.Tensor | None,
    group_weights: torch.Tensor | None,
    workspace=None,
) -> _Inputs:
    """The optional inputs converted for the kernels: masks and key sets as int8 flags, the mask
    expanded to ``(B, R, T)``, per-key edits as float32 ``(B, H, T)`` (``_per_key``), weights and head
    scales as float32; each made once per tensor given while ``workspace`` keeps it."""
    device, num_heads = query.device, plan.num_heads
    shape = (plan.bsz, plan.num_rows, plan.kv_len, num_heads, device)
    allowed = _kept(workspace, "allowed", allowed, lambda: _as_flag(allowed, device).expand(*shape[:3]), key=shape)
    tgt, gate, eligible = (
        (None,) * 3
        if spec is None
        else (
            _kept(workspace, f"flags {role}", t, lambda t=t: _as_flag(t, device), key=device, per_layer=True)
            for role, t in (("target", spec.target), ("gate", spec.gate), ("query mask", spec.query_mask))
        )
    )
    weights = _kept(workspace, "weights", group_weights, lambda: _as_float(group_weights, device), key=device)
    scale = _as_float(head_scale, device)
    source = None if spec is None else spec.source
    placeholder = query  # any tensor: flags keep absent inputs unread
    key_inputs = (
        *_operand(allowed, placeholder, 3),
        *_operand(_per_key_kept(workspace, "boost", key_boost, num_heads, torch.float32, device), placeholder, 3),
        *_operand(_per_key_kept(workspace, "bias", key_bias, num_heads, torch.float32, device), placeholder, 3),
        *_operand(
            _per_key_kept(workspace, "source", source, num_heads, torch.int8, device, per_layer=True), placeholder, 3
        ),
        *_operand(tgt, placeholder, 2),
    )
    return _Inputs(placeholder, spec, allowed, gate, eligible, weights, scale, key_inputs)


def _per_key_kept(workspace, name, t, num_heads, dtype, device, per_layer=False) -> torch.Tensor | None:
    """``t`` in ``dtype`` on ``device`` as ``(B, H, T)`` (``_per_key``), made once while ``workspace`` keeps it."""
    make = lambda: _per_key(t.to(device, dtype), num_heads)
    return _kept(workspace, name, t, make, key=(num_heads, device), per_layer=per_layer)


def _allocate(query: torch.Tensor, plan: _Plan, inputs: _Inputs, workspace=None) -> _Buffers:
    """Uninitialised buffers for the partials, the output (float32 for bfloat16 under the interpreter,
    else the query's dtype) and the merged results. The buffers a call reads only inside itself (the
    partials and the merged normaliser) come from ``workspace`` where one is given, shared by the calls
    of the same shapes; the output and the group masses are the call's own."""
    f32 = dict(device=query.device, dtype=torch.float32)
    parts, num_groups, placeholder = inputs.parts, inputs.num_groups, inputs.placeholder
    redistributes, grouped = inputs.redistribution is not None, inputs.weights is not None

    def scratch() -> tuple[torch.Tensor, ...]:
        per_split = (plan.rows, plan.num_heads, plan.splits)  # one slot per split of each (row, head)
        return (
            torch.empty(*per_split, **f32),
            torch.empty(*per_split, **f32),
            torch.empty(*per_split, parts, plan.head_dim, **f32),
            torch.empty(*per_split, 4, **f32) if redistributes else None,
            torch.empty(*per_split, parts, num_groups, **f32) if grouped else None,
            torch.empty(plan.rows, plan.num_heads, 4, **f32),
        )

    if workspace is None:
        kept = scratch()
    else:
        sizes = (plan.rows, plan.num_heads, plan.splits, plan.head_dim, parts, num_groups, redistributes, grouped)
        kept = workspace.get("kernel buffers", (), scratch, key=(sizes, query.device))
    part_m, part_l, part_acc, part_mass, part_w, final = kept
    out_dtype = torch.float32 if plan.interpreted_bf16 else query.dtype
    return _Buffers(
        part_m=part_m,
        part_l=part_l,
        part_acc=part_acc,
        part_mass=placeholder if part_mass is None else part_mass,
        part_w=placeholder if part_w is None else part_w,
        out=torch.empty(plan.bsz, plan.num_rows, plan.num_heads, plan.head_dim, device=query.device, dtype=out_dtype),
        mass=torch.empty(plan.rows, plan.num_heads, num_groups, **f32) if grouped else placeholder,
        final=final,
    )


def _edit_flags(plan: _Plan, inputs: _Inputs, softcap: float | None, key_boost, key_bias) -> dict:
    """The compile-time flags of the score edits, shared by the main pass and the head-row pass.
    Without a mask, several query rows are causal (row ``r`` sees keys up to ``first_row + r``)."""
    return dict(
        SOFTCAP=softcap is not None,
        DOT=plan.dot,
        DOT_F32=plan.dot and plan.interpreted_bf16,
        BOOST=key_boost is not None,
        BIAS=key_bias is not None,
        MASK=inputs.allowed is not None,
        CAUSAL=inputs.allowed is None and plan.num_rows > 1,
    )


def _launch_partials(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: _Plan,
    inputs: _Inputs,
    buffers: _Buffers,
    edits: dict,
    scores: tuple[float, float],
    num_warps: int | None,
) -> None:
    """The main pass: one program per (batch row x query row, key/value head, split) writes the split's
    running maximum and sum and its partial outputs, masses and group sums into ``buffers``."""
    b, p, ng = buffers, inputs.placeholder, inputs.num_groups
    _partials_kernel[(plan.rows, plan.kv_heads, plan.splits)](
        query, query.stride(0), query.stride(1), query.stride(2),
        key, key.stride(0), key.stride(1), key.stride(2),
        value, value.stride(0), value.stride(1), value.stride(2),
        *inputs.key_inputs, *_operand(inputs.gate, p, 2), *_operand(inputs.weights, p, 3),
        b.part_m, b.part_l, b.part_acc, b.part_mass, b.part_w,
        plan.num_rows, plan.num_heads, plan.group, plan.kv_len, plan.head_dim, ng, plan.first_row,
        plan.keys_per_split, *scores,
        NUM_SPLITS=plan.splits, PARTS=inputs.parts, BLOCK_G=plan.block_g, BLOCK_T=plan.block_t,
        BLOCK_D=plan.block_d, BLOCK_NG=next_power_of_2(max(ng, 1)),
        REDISTRIBUTE=inputs.redistribution is not None, GATE=inputs.gate is not None,
        GROUPS=inputs.weights is not None, **edits,
        num_warps=num_warps or 2,
    )  # fmt: skip


def _launch_merge(plan: _Plan, inputs: _Inputs, buffers: _Buffers) -> None:
    """The merge: one program per (batch row x query row, query head) combines the splits under the
    shared normaliser ``m = max_s m_s``, ``l = sum_s exp(m_s - m) l_s``, applies the redistribution's
    factors and the head scale, and writes the output, the group masses and ``final``."""
    b, p, ng, spec = buffers, inputs.placeholder, inputs.num_groups, inputs.redistribution
    # one merge program per query head: grouping heads here (no products) only piles up registers
    _merge_kernel[(plan.rows, plan.num_heads)](
        b.part_m, b.part_l, b.part_acc, b.part_mass, b.part_w,
        b.out, b.out.stride(0), b.out.stride(1), b.out.stride(2),
        *_operand(inputs.scale, p, 2), *_operand(inputs.eligible, p, 2),
        b.mass, b.final,
        plan.num_rows, plan.num_heads, 1, plan.head_dim, ng,
        float(spec.keep) if spec is not None else 1.0,
        float(spec.gate_min_mass) if spec is not None else 0.0,
        float(spec.gate_max_source_share) if spec is not None else 1.0,
        NUM_SPLITS=plan.splits, PARTS=inputs.parts, BLOCK_G=1, BLOCK_S=next_power_of_2(plan.splits),
        BLOCK_D=plan.block_d, BLOCK_NG=next_power_of_2(max(ng, 1)),
        REDISTRIBUTE=spec is not None, GATE=inputs.gate is not None, ELIGIBLE=inputs.eligible is not None,
        GROUPS=inputs.weights is not None, HEAD_SCALE=inputs.scale is not None,
    )  # fmt: skip


def _group_masses(plan: _Plan, inputs: _Inputs, buffers: _Buffers) -> dict[str, torch.Tensor]:
    """``{"mass": (B, R, H, NG)}`` with group weights, else an empty dict."""
    if inputs.weights is None:
        return {}
    return {"mass": buffers.mass.view(plan.bsz, plan.num_rows, plan.num_heads, inputs.num_groups)}


def _head_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    plan: _Plan,
    inputs: _Inputs,
    buffers: _Buffers,
    edits: dict,
    scores: tuple[float, float],
) -> dict[str, torch.Tensor]:
    """The second pass: ``max_h a_j`` and ``mean_h a_j``, ``(B, R, T)`` each, from the scores recomputed
    with the merged normaliser and factors, one program per (batch row x query row, block of keys)."""
    f32 = dict(device=query.device, dtype=torch.float32)
    head_max = torch.empty(plan.rows, plan.kv_len, **f32)
    head_mean = torch.empty(plan.rows, plan.kv_len, **f32)
    _rows_kernel[(plan.rows, cdiv(max(plan.kv_len, 1), plan.block_t))](
        query, query.stride(0), query.stride(1), query.stride(2),
        key, key.stride(0), key.stride(1), key.stride(2),
        *inputs.key_inputs,
        buffers.final, head_max, head_mean,
        plan.num_rows, plan.num_heads, plan.kv_heads, plan.group, plan.kv_len, plan.head_dim, plan.first_row,
        *scores,
        BLOCK_G=plan.block_g, BLOCK_T=plan.block_t, BLOCK_D=plan.block_d,
        REDISTRIBUTE=inputs.redistribution is not None, **edits,
    )  # fmt: skip
    shape = (plan.bsz, plan.num_rows, plan.kv_len)
    return {"head_max": head_max.view(shape), "head_mean": head_mean.view(shape)}


def decode_attention(
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
    redistribution=None,
    head_scale: torch.Tensor | None = None,
    group_weights: torch.Tensor | None = None,
    head_rows: bool = False,
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    workspace=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Edited attention of ``R`` query rows and its statistics (see the module docstring).

    Args:
        query: ``(B, H, R, D)``, the last ``R`` query rows of the call.
        key, value: ``(B, Hkv, T, D)``, the whole cache (``H`` a multiple of ``Hkv``).
        scaling: the score scale; ``softcap``: soft-capping of the scores (None: off).
        allowed: ``(B|1, R, T)`` bool, True where a row may attend; None: causal, query row ``r`` at
            key index ``first_row + r`` (default ``T - R``: the rows are the last ``R`` keys).
        key_boost, key_bias: ``(B, T)`` or ``(B, H|1, T)`` float: ``z += boost |z|``, then ``z += bias``.
        redistribution: a ``halluguard.attention.edits.Redistribution`` (source ``(B, H|1, T')``,
            target and gate ``(B, T')``, ``T' >= T``: keys past ``T`` are never read; ``query_mask (B, R)``),
            or None.
        head_scale: ``(B, H)``, multiplies each head's output.
        group_weights: ``(B, NG, T)`` float key weights whose weighted attention sums are reported.
        head_rows: also report the head-max and head-mean rows (a second pass over the keys).
        num_splits: key ranges merged at the end (default: fill the GPU; tests set it).
        block_t: keys per block (default: from the group size and head dimension).
        num_warps: warps per program of the main pass (default 2).
        workspace: keeps the inputs' conversions and internal buffers between calls sharing them
            (``halluguard.attention.derived.Derived``); None makes everything anew.

    Returns:
        ``out (B, R, H, D)`` in the query's dtype, and float32 statistics: ``"mass" (B, R, H, NG)``
        with ``group_weights``; ``"head_max"`` and ``"head_mean" (B, R, T)`` with ``head_rows``.
    """
    require_triton()
    plan = _plan(query, key, value, first_row, num_splits, block_t, workspace)
    inputs = _prepare_inputs(
        query, plan, allowed, key_boost, key_bias, redistribution, head_scale, group_weights, workspace
    )
    buffers = _allocate(query, plan, inputs, workspace)
    edits = _edit_flags(plan, inputs, softcap, key_boost, key_bias)
    scores = (float(scaling), float(softcap or 1.0))
    _launch_partials(query, key, value, plan, inputs, buffers, edits, scores, num_warps)
    _launch_merge(plan, inputs, buffers)
    stats = _group_masses(plan, inputs, buffers)
    if head_rows:
        stats.update(_head_rows(query, key, plan, inputs, buffers, edits, scores))
    return buffers.out if buffers.out.dtype == query.dtype else buffers.out.to(query.dtype), stats
