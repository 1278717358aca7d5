"""The reference fused operation against a brute-force, loop-per-row eager computation."""

import math

import pytest
import torch

from halluguard.attention import AttentionEdit, Redistribution, Reductions, reference_attention
from halluguard.attention.reference import reduce_last_row

B, H, HKV, T, D = 2, 4, 2, 9, 8


def brute_force(q, k, v, scaling, allowed, bias=None, boost=None, head_scale=None, redist=None):
    """Row-by-row eager attention with the edits written out literally from their definitions."""
    bsz, heads, rows, dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(bsz, rows, heads, dim, dtype=torch.float64)
    probs_all = torch.zeros(bsz, heads, rows, k.shape[2], dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            kh, vh = k[b, h // groups].double(), v[b, h // groups].double()
            for i in range(rows):
                z = [float(q[b, h, i].double() @ kh[j]) * scaling for j in range(kh.shape[0])]
                if boost is not None:
                    z = [zj + float(boost[b, j]) * abs(zj) for j, zj in enumerate(z)]
                if bias is not None:
                    z = [zj + float(bias[b, j]) for j, zj in enumerate(z)]
                z = [zj if allowed[b, i, j] else -math.inf for j, zj in enumerate(z)]
                if max(z) == -math.inf:  # a padding query row sees no key: zeros
                    continue
                m = max(z)
                e = [math.exp(zj - m) if zj > -math.inf else 0.0 for zj in z]
                a = [ej / sum(e) for ej in e]
                if redist is not None:
                    src, tgt, keep, gate, min_mass, max_share = redist
                    tgt_b = [bool(tgt[b, j]) and not bool(src[b, j]) for j in range(len(a))]
                    m_src = sum(a[j] for j in range(len(a)) if src[b, j])
                    m_tgt = sum(a[j] for j in range(len(a)) if tgt_b[j])
                    m_gate = sum(a[j] for j in range(len(a)) if gate[b, j])
                    m_gate_src = sum(a[j] for j in range(len(a)) if gate[b, j] and src[b, j])
                    if m_tgt > 0 and m_gate >= min_mass and m_gate_src <= max_share * m_gate:
                        budget = (1 - keep) * m_src
                        a = [
                            a[j] * keep if src[b, j] else a[j] + (budget * a[j] / m_tgt if tgt_b[j] else 0.0)
                            for j in range(len(a))
                        ]
                probs_all[b, h, i] = torch.tensor(a, dtype=torch.float64)
                o = sum(a[j] * vh[j] for j in range(len(a)))
                if head_scale is not None:
                    o = o * float(head_scale[b, h])
                out[b, i, h] = o
    return out, probs_all


def causal_allowed(rows, kv_len, valid):
    pos = torch.arange(kv_len)
    causal = pos[None, :] <= torch.arange(kv_len - rows, kv_len)[:, None]
    return causal[None] & valid[:, None, :]


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, HKV, T, D, generator=g)
    v = torch.randn(B, HKV, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :2] = False  # left padding in row 1
    return q, k, v, valid


def run(q, k, v, valid, rows=T, **edit_kwargs):
    allowed = causal_allowed(rows, T, valid)
    out, probs = reference_attention(
        q[:, :, -rows:],
        k,
        v,
        scaling=D**-0.5,
        mask=allowed[:, None],
        edits=[AttentionEdit(**edit_kwargs)] if edit_kwargs else [],
    )
    stats = reduce_last_row(probs[:, :, -1], Reductions({"a": valid, "b": ~valid}, headmax_from_key=3))
    return out, stats, allowed


def real_rows(valid, rows=T):
    """Query rows that see at least one key (padding query rows have no defined output)."""
    return causal_allowed(rows, T, valid).any(-1)


def test_plain_matches_brute_force(qkv):
    q, k, v, valid = qkv
    out, stats, allowed = run(q, k, v, valid)
    want, probs = brute_force(q, k, v, D**-0.5, allowed)
    keep = real_rows(valid)
    torch.testing.assert_close(out.double()[keep], want[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["mass/a"].double(), probs[:, :, -1][..., :].mul(valid[:, None]).sum(-1))
    torch.testing.assert_close(stats["headmax_row"].double(), probs[:, :, -1].amax(1)[:, 3:])
    torch.testing.assert_close(stats["headmax_sum"].double(), probs[:, :, -1].amax(1).sum(-1))


def test_plain_matches_sdpa(qkv):
    q, k, v, valid = qkv
    out, _, allowed = run(q, k, v, valid)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1), attn_mask=allowed[:, None]
    )
    keep = real_rows(valid)
    torch.testing.assert_close(out[keep], sdpa.transpose(1, 2)[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("last_row_only", [False, True])
def test_bias_boost_and_head_scale(qkv, last_row_only):
    q, k, v, valid = qkv
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(B, T, generator=g)
    bias[0, 4] = -math.inf  # a masked key
    boost = torch.rand(B, T, generator=g) * (torch.arange(T) % 2 == 0)
    scale = torch.rand(B, H, generator=g) * 2
    out, _, allowed = run(q, k, v, valid, key_bias=bias, key_boost=boost, head_scale=scale, last_row_only=last_row_only)
    edited, _ = brute_force(q, k, v, D**-0.5, allowed, bias=bias, boost=boost, head_scale=scale)
    plain, _ = brute_force(q, k, v, D**-0.5, allowed)
    want = edited.clone()
    if last_row_only:
        want[:, :-1] = plain[:, :-1]
    keep = real_rows(valid)
    torch.testing.assert_close(out.double()[keep], want[keep], atol=1e-5, rtol=1e-5)


def test_redistribution_matches_brute_force_and_keeps_rows_stochastic(qkv):
    q, k, v, valid = qkv
    image = torch.zeros(B, T, dtype=torch.bool)
    image[:, 3:7] = True
    sinks = torch.zeros(B, T, dtype=torch.bool)
    sinks[0, [0, 4]] = True
    sinks[1, [2, 5]] = True
    spec = Redistribution(
        source=sinks, target=image, keep=0.6, gate=image, gate_min_mass=0.2, gate_max_source_share=0.5
    )
    out, stats, allowed = run(q, k, v, valid, redistribution=spec)
    want, _ = brute_force(q, k, v, D**-0.5, allowed, redist=(sinks, image, 0.6, image, 0.2, 0.5))
    keep = real_rows(valid)
    torch.testing.assert_close(out.double()[keep], want[keep], atol=1e-5, rtol=1e-5)
    # the reported masses are of the final rows, which still sum to 1
    total = stats["mass/a"] + stats["mass/b"]
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    # and the redistribution did change something: some row was selected
    plain, _ = brute_force(q, k, v, D**-0.5, allowed)
    assert (want - plain).abs().max() > 1e-3


def test_redistribution_rows_sum_to_one_random():
    """Row sums after redistribution, over many random rows and settings."""
    from halluguard.attention.reference import redistribute

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(3, 5, 7, 40, generator=g) * 3, -1)
    for keep in (0.0, 0.3, 1.0):
        src = torch.rand(3, 5, 40, generator=g) < 0.1
        tgt = torch.rand(3, 40, generator=g) < 0.5
        out = redistribute(probs, Redistribution(source=src, target=tgt, keep=keep), slice(None))
        torch.testing.assert_close(out.sum(-1), torch.ones(3, 5, 7), atol=1e-6, rtol=0)
        assert (out >= 0).all()


def test_query_mask_limits_the_rows(qkv):
    q, k, v, valid = qkv
    image = torch.zeros(B, T, dtype=torch.bool)
    image[:, 2:6] = True
    sinks = torch.zeros(B, T, dtype=torch.bool)
    sinks[:, 3] = True
    eligible = torch.zeros(B, T, dtype=torch.bool)
    eligible[:, 7:] = True
    base, _, _ = run(q, k, v, valid)
    out, _, _ = run(q, k, v, valid, redistribution=Redistribution(sinks, image, keep=0.0, query_mask=eligible))
    torch.testing.assert_close(out[:, :7], base[:, :7])
    assert (out[:, 7:] - base[:, 7:]).abs().max() > 1e-4


def test_decode_row_with_gqa_and_dtypes():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 8, 1, 16, generator=g)
    k = torch.randn(2, 2, 30, 16, generator=g)
    v = torch.randn(2, 2, 30, 16, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        out, _ = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), scaling=0.25, mask=None)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), scale=0.25
        ).transpose(1, 2)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_edits_keep_the_graph_differentiable(qkv):
    q, k, v, valid = qkv
    q = q.clone().requires_grad_(True)
    boost = torch.full((B, T), 0.3)
    bias = torch.zeros(B, T)
    spec = Redistribution(
        source=torch.zeros(B, T, dtype=torch.bool).index_fill(1, torch.tensor([0]), True),
        target=torch.ones(B, T, dtype=torch.bool),
        keep=0.5,
    )
    out, _ = reference_attention(
        q,
        k,
        v,
        scaling=0.3,
        mask=causal_allowed(T, T, valid)[:, None],
        edits=[AttentionEdit(key_boost=boost, key_bias=bias, redistribution=spec, head_scale=torch.ones(B, H))],
    )
    out[real_rows(valid)].sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
