"""The decode step's few-product attention against the reference, edit by edit, and the tensors it keeps."""

import pytest
import torch

from halluguard.attention import AttentionEdit, Redistribution
from halluguard.attention.decode_step import decode_step, fits, probabilities
from halluguard.attention.derived import Derived
from halluguard.attention.reference import reference_attention
from halluguard.bench.ops import count

B, H, HKV, T, D = 3, 4, 2, 11, 8


def tensors(seed=0, heads=H, kv_heads=HKV):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, 1, D, generator=gen)
    k = torch.randn(B, kv_heads, T, D, generator=gen)
    v = torch.randn(B, kv_heads, T, D, generator=gen)
    return q, k, v


def padded_mask(kind):
    """Row b has b padding keys on the left: boolean ``(B, 1, 1, T)``, its additive form, or None; or
    ``shared``: one boolean row for every batch row ``(1, 1, 1, T)`` (the first two keys hidden)."""
    if kind is None:
        return None
    if kind == "shared":
        return (torch.arange(T) >= 2)[None, None, None, :]
    allowed = torch.arange(T)[None, :] >= torch.arange(B)[:, None]
    allowed = allowed[:, None, None, :]
    if kind == "bool":
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def key_sets(seed=1):
    gen = torch.Generator().manual_seed(seed)
    source = torch.rand(B, T, generator=gen) < 0.3
    target = torch.rand(B, T, generator=gen) < 0.5
    gate = torch.rand(B, T, generator=gen) < 0.6
    return source, target, gate


def four_keys(scores):
    """One query row and head over 4 keys whose scores at scaling 1 are ``scores``."""
    q = torch.ones(1, 1, 1, 4)
    k = torch.zeros(1, 1, 4, 4)
    k[0, 0, :, 0] = torch.tensor(scores)
    v = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return q, k, v


def subnormal_target():
    """``(q, k, v, source, target)``: scores 0, -101, -200, -1, the source the first key and the target
    the next two, whose mass is subnormal."""
    source = torch.tensor([[True, False, False, False]])
    target = torch.tensor([[False, True, True, False]])
    return (*four_keys([0.0, -101.0, -200.0, -1.0]), source, target)


def edit_cases():
    gen = torch.Generator().manual_seed(2)
    boost = torch.where(torch.rand(B, T, generator=gen) < 0.5, 0.5, 0.0)
    bias = torch.randn(B, T, generator=gen)
    head_bias = torch.randn(B, H, T, generator=gen)
    source, target, gate = key_sets()
    everything = Redistribution(source, target, keep=0.3, gate=gate, gate_min_mass=0.2, gate_max_source_share=0.7)
    wider = Redistribution(
        torch.nn.functional.pad(source, (0, 5)), torch.nn.functional.pad(target, (0, 5), value=True), keep=0.3,
        gate=torch.nn.functional.pad(gate, (0, 5), value=True), gate_min_mass=0.2, gate_max_source_share=0.7,
    )  # fmt: skip
    eligible = torch.tensor([[True], [False], [True]])
    early = [torch.nn.functional.pad(t, (0, 5)) for t in (source, target, gate)]  # kept longer than the keys
    for t in early:
        t[:, T - 4 :] = False  # no set holds the last 4 keys: only the keys before are read and edited
    shorter = Redistribution(*early[:2], keep=0.3, gate=early[2], gate_min_mass=0.2, gate_max_source_share=0.7)
    shared = Redistribution(source[:1], target[:1], keep=0.3, gate=gate[:1], gate_min_mass=0.2)
    return {
        "none": [],
        "boost": [AttentionEdit(key_boost=boost, last_row_only=True)],
        "bias": [AttentionEdit(key_bias=bias)],
        "biases": [AttentionEdit(key_bias=bias), AttentionEdit(key_bias=head_bias)],
        "head boost": [AttentionEdit(key_boost=boost[:, None].expand(B, H, T) * torch.rand(B, H, T, generator=gen))],
        "redistribution": [AttentionEdit(redistribution=Redistribution(source, target, keep=0.1))],
        "gated redistribution": [AttentionEdit(redistribution=everything)],
        "sets longer than the keys": [AttentionEdit(redistribution=wider)],
        "sets that end before the last keys": [AttentionEdit(redistribution=shorter)],
        "one set for every row": [AttentionEdit(redistribution=shared)],
        "eligible rows": [AttentionEdit(redistribution=Redistribution(source, target, keep=0.0, query_mask=eligible))],
        "boost, then redistribution": [
            AttentionEdit(key_boost=boost),
            AttentionEdit(redistribution=everything),
        ],
    }


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "shared"])
@pytest.mark.parametrize("case", list(edit_cases()))
@pytest.mark.parametrize("kv_heads", [HKV, H])
def test_the_decode_step_is_the_reference(case, mask_kind, kv_heads):
    edits = edit_cases()[case]
    q, k, v = tensors(kv_heads=kv_heads)
    mask = padded_mask(mask_kind)
    assert fits(q, edits, softcap=None)
    want, want_probs = reference_attention(q, k, v, scaling=0.3, mask=mask, edits=edits)
    out, probs = decode_step(q, k, v, scaling=0.3, mask=mask, edits=edits, derived=Derived())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, want_probs[:, :, 0], rtol=1e-5, atol=1e-7)
    if not edits:
        torch.testing.assert_close(probabilities(q, k, scaling=0.3, mask=mask, derived=Derived()), probs)


def test_every_edit_case_changes_the_attention():
    """(Else the comparison with the reference would prove nothing about that edit.)"""
    q, k, v = tensors()
    plain, _ = decode_step(q, k, v, scaling=0.3, mask=None, edits=[], derived=Derived())
    for case, edits in edit_cases().items():
        if edits:
            out, _ = decode_step(q, k, v, scaling=0.3, mask=None, edits=edits, derived=Derived())
            assert (out - plain).abs().max() > 1e-3, case


def test_redistribution_selects_exactly_the_rows_the_reference_selects():
    """A row whose target holds no mass, one whose gate mass is below the minimum and one whose source
    share is too high keep their attention; the others move it."""
    q, k, v = tensors()
    source = torch.zeros(B, T, dtype=torch.bool)
    source[:, :3] = True
    target = torch.zeros(B, T, dtype=torch.bool)
    target[0, 5:] = True  # row 0: a target
    target[1, :3] = True  # row 1: the target is the source, so none is left
    target[2, 5:] = True
    gate = torch.zeros(B, T, dtype=torch.bool)
    gate[0] = True
    gate[2, :4] = True  # row 2: the gate is mostly source
    spec = Redistribution(source, target, keep=0.2, gate=gate, gate_min_mass=0.0, gate_max_source_share=0.5)
    edits = [AttentionEdit(redistribution=spec)]
    _, plain = decode_step(q, k, v, scaling=0.3, mask=None, edits=[], derived=Derived())
    _, edited = decode_step(q, k, v, scaling=0.3, mask=None, edits=edits, derived=Derived())
    _, want = reference_attention(q, k, v, scaling=0.3, mask=None, edits=edits)
    torch.testing.assert_close(edited, want[:, :, 0], rtol=1e-5, atol=1e-7)
    moved = (edited - plain).abs().amax(-1) > 1e-6  # (B, H)
    assert moved[0].all() and not moved[1].any() and not moved[2].any()


def test_the_gate_mass_minimum_selects_the_rows_the_reference_selects():
    """With the minimum between the rows' gate masses, the rows above it move their attention and the
    rows below keep it, as in the reference."""
    q, k, v = tensors()
    source, target, gate = key_sets()
    _, plain = decode_step(q, k, v, scaling=0.3, mask=None, edits=[], derived=Derived())
    gate_mass = (plain * gate[:, None].float()).sum(-1)  # (B, H)
    ordered = gate_mass.flatten().sort().values
    middle = len(ordered) // 2
    assert ordered[middle] - ordered[middle - 1] > 1e-3  # no row near the minimum (the rounding of three sums)
    minimum = float(ordered[middle - 1] + ordered[middle]) / 2
    spec = Redistribution(source, target, keep=0.2, gate=gate, gate_min_mass=minimum, gate_max_source_share=1.0)
    edits = [AttentionEdit(redistribution=spec)]
    _, edited = decode_step(q, k, v, scaling=0.3, mask=None, edits=edits, derived=Derived())
    _, want = reference_attention(q, k, v, scaling=0.3, mask=None, edits=edits)
    torch.testing.assert_close(edited, want[:, :, 0], rtol=1e-5, atol=1e-7)
    moved = (edited - plain).abs().amax(-1) > 1e-6
    assert moved[gate_mass > minimum + 1e-4].all() and not moved[gate_mass < minimum - 1e-4].any()
    assert moved.any() and not moved.all()


def test_a_source_share_bound_above_one_with_a_subnormal_target_mass_stays_finite():
    """A share bound above 1 bounds nothing; with a subnormal target mass the gate's columns are divided
    by about ``tiny`` and must stay finite (their factor is zero: an infinity would make NaN)."""
    q, k, v, source, target = subnormal_target()
    gate = torch.ones(1, 4, dtype=torch.bool)
    spec = Redistribution(source, target, keep=0.5, gate=gate, gate_min_mass=0.5, gate_max_source_share=10.0)
    edits = [AttentionEdit(redistribution=spec)]
    out, probs = decode_step(q, k, v, scaling=1.0, mask=None, edits=edits, derived=Derived())
    want, want_probs = reference_attention(q, k, v, scaling=1.0, mask=None, edits=edits)
    _, plain = decode_step(q, k, v, scaling=1.0, mask=None, edits=[], derived=Derived())
    assert 0 < plain[0, 0, 1] < torch.finfo(torch.float32).tiny  # the target's mass is subnormal
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert probs[0, 0, 0] < plain[0, 0, 0] * 0.6  # selected: the source kept half its mass
    torch.testing.assert_close(probs, want_probs[:, :, 0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_a_gate_holding_almost_nothing_under_a_minimum_of_zero_is_compared_exactly():
    """A gate minimum of 0 and a gate of about 1e-9 of mass, all on source keys: its share is above the
    bound, so the reference keeps the row; compared 1.5 above its value the share would round to met."""
    q, k, v = four_keys([0.0, -21.0, -1.0, -2.0])  # the gate (key 1) holds about 5e-10
    source = torch.tensor([[True, True, False, False]])
    target = torch.tensor([[False, False, True, False]])
    gate = torch.tensor([[False, True, False, False]])
    spec = Redistribution(source, target, keep=0.5, gate=gate, gate_min_mass=0.0, gate_max_source_share=0.5)
    edits = [AttentionEdit(redistribution=spec)]
    _, probs = decode_step(q, k, v, scaling=1.0, mask=None, edits=edits, derived=Derived())
    _, plain = decode_step(q, k, v, scaling=1.0, mask=None, edits=[], derived=Derived())
    _, want = reference_attention(q, k, v, scaling=1.0, mask=None, edits=edits)
    assert 0 < plain[0, 0, 1] < 1e-8
    assert torch.equal(probs, plain)  # not selected
    torch.testing.assert_close(probs, want[:, :, 0], rtol=1e-5, atol=1e-8)


def test_a_gate_minimum_of_a_sixteenth_or_more_selects_in_one_reduction():
    """VAR's gate minimum (0.2) takes the one-reduction selection: one operation fewer per call than
    the exact comparison that a minimum near 0 takes, with the same result on these rows."""
    q, k, v = tensors()
    source, target, gate = key_sets()

    def operations(minimum: float) -> int:
        spec = Redistribution(source, target, keep=0.3, gate=gate, gate_min_mass=minimum, gate_max_source_share=0.7)
        edits, derived = [AttentionEdit(redistribution=spec)], Derived()

        def step():
            return decode_step(q, k, v, scaling=0.3, mask=None, edits=edits, derived=derived)[1]

        _, want = reference_attention(q, k, v, scaling=0.3, mask=None, edits=edits)
        torch.testing.assert_close(step(), want[:, :, 0], rtol=1e-5, atol=1e-7)  # (first call: makes what is kept)
        return count(step).aten

    assert operations(0.2) == operations(0.0) - 1


@pytest.mark.parametrize(
    "edits,query_rows,softcap",
    [
        ([AttentionEdit(key_bias=torch.zeros(B, T)), AttentionEdit(key_boost=torch.zeros(B, T))], 1, None),
        ([AttentionEdit(key_boost=torch.zeros(B, T)), AttentionEdit(key_boost=torch.zeros(B, T))], 1, None),
        (
            [
                AttentionEdit(
                    redistribution=Redistribution(torch.zeros(B, H, T, dtype=torch.bool), torch.ones(B, T), 0.5)
                )
            ],
            1,
            None,
        ),
        ([], 2, None),
        ([], 1, 30.0),
    ],
    ids=["a boost after a bias", "two boosts", "per-head source", "two query rows", "soft-capped scores"],
)
def test_what_the_few_products_do_not_take(edits, query_rows, softcap):
    query = torch.zeros(B, H, query_rows, D)
    assert not fits(query, edits, softcap)


def test_derived_tensors_are_made_once_per_source_and_remade_for_another():
    made = []
    derived = Derived(per_name=2)
    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)

    def make(tag):
        return lambda: made.append(tag) or len(made)

    assert derived.get("x", (a,), make("a")) == 1
    assert derived.get("x", (a,), make("a")) == 1  # kept
    assert derived.get("x", (b,), make("b")) == 2  # an equal but other tensor: made anew
    assert derived.get("x", (a,), make("a")) == 1  # both kept
    assert derived.get("x", (c,), make("c")) == 3  # a third: the oldest goes
    assert derived.get("x", (b,), make("b")) == 4
    assert derived.get("y", (a,), make("y")) == 5  # names apart
    assert made == ["a", "b", "c", "b", "y"]


def test_the_kept_mask_and_edit_tensors_are_reused_across_calls():
    """The layers of a forward share the mask and edits: the second call makes nothing."""
    q, k, v = tensors()
    edits = edit_cases()["boost, then redistribution"]
    mask = padded_mask("bool")
    made = []

    class Counting(Derived):
        def get(self, name, sources, make, key=None, keep=None):
            return super().get(name, sources, lambda: made.append(name) or make(), key, keep)

    derived = Counting()
    decode_step(q, k, v, scaling=0.3, mask=mask, edits=edits, derived=derived)
    assert set(made) == {"allowed", "key bias", "key boost", "redistribution", "constant"}  # the mask, ...
    first = list(made)
    out, _ = decode_step(q, k, v, scaling=0.3, mask=mask, edits=edits, derived=derived)
    assert made == first
    want, _ = reference_attention(q, k, v, scaling=0.3, mask=mask, edits=edits)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_a_bias_that_blocks_every_visible_key_gives_zeros_as_the_reference():
    q, k, v = tensors()
    mask = padded_mask("bool")
    bias = torch.zeros(B, T)
    bias[2] = -torch.inf  # row 2 may see no key at all
    edits = [AttentionEdit(key_bias=bias)]
    out, probs = decode_step(q, k, v, scaling=0.3, mask=mask, edits=edits, derived=Derived())
    want, want_probs = reference_attention(q, k, v, scaling=0.3, mask=mask, edits=edits)
    assert torch.equal(probs[2], torch.zeros_like(probs[2])) and torch.equal(out[2], torch.zeros_like(out[2]))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, want_probs[:, :, 0], rtol=1e-5, atol=1e-7)


def test_kept_redistribution_columns_follow_its_settings():
    """The same key sets with another share kept (or gate) make other columns, not the kept ones."""
    q, k, v = tensors()
    source, target, gate = key_sets()
    derived = Derived()
    for keep, gate_min in ((0.3, 0.0), (0.8, 0.0), (0.8, 0.5)):
        edits = [AttentionEdit(redistribution=Redistribution(source, target, keep, gate=gate, gate_min_mass=gate_min))]
        out, _ = decode_step(q, k, v, scaling=0.3, mask=None, edits=edits, derived=derived, layer=3)
        want, _ = reference_attention(q, k, v, scaling=0.3, mask=None, edits=edits)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_statistics_of_several_rows_from_a_one_row_call_are_its_one_row():
    from halluguard.attention.hook import _Attended

    last = torch.rand(B, H, T)
    rows = _Attended(torch.zeros(B, 1, H, D), last=last).rows(3)
    assert rows.shape == (B, H, 1, T) and torch.equal(rows[:, :, 0], last)
    assert _Attended(torch.zeros(B, 1, H, D), last=last).rows(1) is None


def test_a_redistribution_with_no_target_key_changes_nothing():
    q, k, v = tensors()
    source, _, gate = key_sets()
    edits = [AttentionEdit(redistribution=Redistribution(source, torch.zeros_like(source), keep=0.1, gate=gate))]
    out, probs = decode_step(q, k, v, scaling=0.3, mask=None, edits=edits, derived=Derived())
    plain, plain_probs = decode_step(q, k, v, scaling=0.3, mask=None, edits=[], derived=Derived())
    want, _ = reference_attention(q, k, v, scaling=0.3, mask=None, edits=edits)
    assert torch.equal(out, plain) and torch.equal(probs, plain_probs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_keys_that_are_not_one_strided_batch_give_the_same_result():
    """Keys whose batch and head dimensions do not merge (a view of another layout) take a reshape."""
    q, k, v = tensors()
    scattered = k.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, head-major in memory
    assert scattered.stride(0) != HKV * scattered.stride(1)
    edits = edit_cases()["gated redistribution"]
    want, _ = decode_step(q, k, v, scaling=0.3, mask=None, edits=edits, derived=Derived())
    out, _ = decode_step(q, scattered, v, scaling=0.3, mask=None, edits=edits, derived=Derived())
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)


def test_with_a_gradient_the_redistribution_is_not_made_in_place():
    """Where a gradient is asked for, the softmax's output is left as it is: the gradient equals the
    reference's."""
    q, k, v = tensors()
    edits = edit_cases()["sets that end before the last keys"]
    grads = []
    for path in (decode_step, reference_attention):
        query = q.clone().requires_grad_(True)
        kwargs = dict(derived=Derived()) if path is decode_step else {}
        out, _ = path(query, k, v, scaling=0.3, mask=None, edits=edits, **kwargs)
        out.square().sum().backward()
        grads.append(query.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_prepare_makes_at_the_prompt_what_the_decode_steps_would_make():
    from halluguard.attention import decode_step as module

    q, k, v = tensors()
    edit = edit_cases()["sets that end before the last keys"][0]  # sets kept for the steps after
    made = []

    class Counting(Derived):
        def get(self, name, sources, make, key=None, keep=None):
            return super().get(name, sources, lambda: made.append(name) or make(), key, keep)

    derived = Counting()
    module.prepare(edit, derived, layer=5, batch=B, num_heads=H, kv_heads=HKV, device=q.device)
    assert "redistribution" in made
    prepared = list(made)
    out, _ = decode_step(q, k, v, scaling=0.3, mask=None, edits=[edit], derived=derived, layer=5)
    assert made == prepared  # the decode step made nothing
    want, _ = reference_attention(q, k, v, scaling=0.3, mask=None, edits=[edit])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_a_target_mass_below_the_smallest_normal_float_gives_what_the_reference_gives():
    """A subnormal target mass: the gain is divided by ``M_T + tiny`` (the reference: ``max(M_T, tiny)``),
    finite, where dividing by ``M_T`` would overflow."""
    q, k, v, source, target = subnormal_target()
    edits = [AttentionEdit(redistribution=Redistribution(source, target, keep=0.5))]
    out, probs = decode_step(q, k, v, scaling=1.0, mask=None, edits=edits, derived=Derived())
    want, want_probs = reference_attention(q, k, v, scaling=1.0, mask=None, edits=edits)
    _, plain = decode_step(q, k, v, scaling=1.0, mask=None, edits=[], derived=Derived())
    assert 0 < plain[0, 0, 1] < torch.finfo(torch.float32).tiny  # the target's mass is subnormal
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    torch.testing.assert_close(probs, want_probs[:, :, 0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
