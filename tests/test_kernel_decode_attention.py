"""The Triton decode-attention kernel against the PyTorch reference of the same operation.

On CPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set in conftest.py);
on a CUDA machine the same tests run the compiled kernel. Tolerance (FlashAttention's rule): the
kernel's error against a float64 oracle is at most twice the PyTorch reference's own error at the
same input dtype, plus ``FLOOR`` for float32 rounding noise. The default run covers block edges,
splits, GQA ratios, batch sizes, head dims, dtypes and a covering set of flag combinations; the
full product is behind the ``kernel_grid`` marker (``python -m pytest -m kernel_grid``).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from halluguard.attention.edits import Redistribution
from halluguard.attention.reference import fused_attention_reference
from halluguard.kernels._compat import HAS_TRITON, interpreting

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or interpreting()),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOOR = 1e-5  # float32 sums in another order (a GPU's dot products) differ by a few 1e-6
BLOCK = 16  # keys per block in these tests: T = 15, 16, 17 are the block edges


@dataclasses.dataclass(frozen=True)
class Flags:
    softcap: bool = False
    boost: str = ""  # "", "row" (B, T) or "head" (B, H, T)
    bias: str = ""
    mask: str = ""  # "", "explicit" (B, R, T), "causal" (R > 1, no mask given)
    redistribution: str = ""  # "", "plain", "gated" (gate and eligible query rows)
    groups: bool = False
    head_scale: bool = False
    head_rows: bool = False


ALL_ON = Flags(True, "head", "row", "explicit", "gated", True, True, True)


def make_case(batch, heads, kv_heads, rows, kv_len, head_dim, dtype, flags: Flags, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    coin = lambda p, *shape: torch.rand(*shape, generator=gen) < p
    case = dict(
        query=rand(batch, heads, rows, head_dim).to(dtype),
        key=rand(batch, kv_heads, kv_len, head_dim).to(dtype),
        value=rand(batch, kv_heads, kv_len, head_dim).to(dtype),
        scaling=head_dim**-0.5 * 2.0,  # sharper than usual, so the edits matter
    )
    if flags.softcap:
        case["softcap"] = 2.5
    for name, how in (("key_boost", flags.boost), ("key_bias", flags.bias)):
        if how:
            shape = (batch, kv_len) if how == "row" else (batch, heads, kv_len)
            case[name] = (coin(0.4, *shape).float() * 0.7) if name == "key_boost" else rand(*shape)
    if flags.mask == "explicit":
        allowed = coin(0.7, batch, rows, kv_len)
        allowed[..., 0] = True
        case["allowed"] = allowed
    elif flags.mask == "causal":
        case["first_row"] = max(kv_len - rows - 1, 0)
    if flags.redistribution:
        gated = flags.redistribution == "gated"
        case["redistribution"] = Redistribution(
            source=coin(0.2, batch, heads, kv_len),
            target=coin(0.5, batch, kv_len),
            keep=0.25,
            gate=coin(0.6, batch, kv_len) if gated else None,
            gate_min_mass=0.05 if gated else 0.0,
            gate_max_source_share=0.9 if gated else 1.0,
            query_mask=coin(0.8, batch, rows) if gated else None,
        )
    if flags.groups:
        weights = coin(0.5, batch, 3, kv_len).float()
        weights[:, 2] = 1.0 / kv_len  # a mean, as Lookback Lens asks
        case["group_weights"] = weights
    if flags.head_scale:
        case["head_scale"] = torch.rand(batch, heads, generator=gen) * 2
    case["head_rows"] = flags.head_rows
    return {k: v.to(DEVICE) if torch.is_tensor(v) else _to_device(v) for k, v in case.items()}


def _to_device(value):
    if isinstance(value, Redistribution):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return Redistribution(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in fields.items()})
    return value


def assert_matches_reference(case: dict, **launch) -> None:
    from halluguard.kernels.decode_attention import decode_attention

    out, stats = decode_attention(**case, **launch)
    ref_out, ref_stats = fused_attention_reference(**case)
    upcast = dict(case, **{k: case[k].double() for k in ("query", "key", "value")})
    oracle_out, oracle_stats = fused_attention_reference(**upcast, compute_dtype=torch.float64)

    def check(name, got, ref, oracle):
        assert got.shape == oracle.shape and got.dtype == ref.dtype, name
        err = (got.double() - oracle).abs().max().item()
        ref_err = (ref.double() - oracle).abs().max().item()
        assert err <= 2 * ref_err + FLOOR, f"{name}: kernel error {err:.3g}, reference error {ref_err:.3g}"

    check("out", out, ref_out, oracle_out)
    assert set(stats) == set(oracle_stats)
    for name in stats:
        check(name, stats[name], ref_stats[name], oracle_stats[name])


# ---- the default run -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_len", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_block_edges_and_splits(kv_len, splits):
    case = make_case(2, 4, 2, 1, kv_len, 64, torch.float32, ALL_ON, seed=kv_len)
    assert_matches_reference(case, num_splits=splits, block_t=BLOCK)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_gqa_batch_and_head_dim(group, batch, head_dim):
    flags = Flags(boost="row", redistribution="plain", groups=True)
    case = make_case(batch, 8, 8 // group, 1, 2 * BLOCK + 3, head_dim, torch.float32, flags, seed=group)
    assert_matches_reference(case, num_splits=2, block_t=BLOCK)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flags", [Flags(), ALL_ON], ids=["plain", "all-flags"])
def test_kernel_low_precision(dtype, flags):
    case = make_case(2, 8, 2, 1, 2 * BLOCK + 7, 64, dtype, flags, seed=3)
    assert_matches_reference(case, num_splits=2, block_t=BLOCK)


# every flag on and off at least once, and each pair of features together somewhere
COVERING = [
    Flags(),
    Flags(softcap=True),
    Flags(boost="row"),
    Flags(boost="head", bias="head"),
    Flags(bias="row", head_scale=True),
    Flags(mask="explicit", groups=True),
    Flags(redistribution="plain", head_rows=True),
    Flags(redistribution="gated", groups=True, head_scale=True),
    Flags(softcap=True, boost="row", redistribution="gated", head_rows=True),
    Flags(bias="head", mask="explicit", redistribution="plain", groups=True),
    Flags(softcap=True, mask="explicit", head_scale=True, head_rows=True),
    ALL_ON,
]


@pytest.mark.parametrize("flags", COVERING, ids=str)
def test_kernel_flag_combinations(flags):
    case = make_case(2, 4, 2, 1, 2 * BLOCK + 1, 64, torch.float32, flags, seed=7)
    assert_matches_reference(case, num_splits=2, block_t=BLOCK)


@pytest.mark.parametrize("mask", ["causal", "explicit", ""])
def test_kernel_several_query_rows(mask):
    """OPERA's candidates side by side (explicit mask), a causal tail of rows, and rows with every key."""
    flags = Flags(mask=mask, boost="row", groups=True, head_rows=True)
    case = make_case(2, 4, 2, 3, 2 * BLOCK + 2, 64, torch.float32, flags, seed=11)
    assert_matches_reference(case, num_splits=2, block_t=BLOCK)


def test_kernel_row_with_no_allowed_key_gives_zeros():
    case = make_case(1, 4, 2, 2, BLOCK + 3, 64, torch.float32, Flags(mask="explicit", groups=True), seed=5)
    case["allowed"][0, 1] = False
    from halluguard.kernels.decode_attention import decode_attention

    out, stats = decode_attention(**case, num_splits=2, block_t=BLOCK)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.equal(stats["mass"][0, 1], torch.zeros_like(stats["mass"][0, 1]))
    assert_matches_reference(case, num_splits=2, block_t=BLOCK)


def test_kernel_redistribution_moves_mass_and_keeps_rows_summing_to_one():
    from halluguard.kernels.decode_attention import decode_attention

    flags = Flags(redistribution="plain", groups=True, head_rows=True)
    case = make_case(2, 4, 2, 1, 3 * BLOCK, 64, torch.float32, flags, seed=2)
    spec = case["redistribution"]
    case["group_weights"] = torch.stack(
        [torch.ones_like(spec.target, dtype=torch.float32), spec.source[:, 0].float(), spec.target.float()], dim=1
    )
    case["redistribution"] = dataclasses.replace(spec, source=spec.source[:, :1])  # per row: a group of its own
    out, stats = decode_attention(**case, num_splits=3, block_t=BLOCK)
    plain_out, plain_stats = decode_attention(**dict(case, redistribution=None), num_splits=3, block_t=BLOCK)
    torch.testing.assert_close(stats["mass"][..., 0], torch.ones_like(stats["mass"][..., 0]))
    moved = plain_stats["mass"][..., 1] * (1 - spec.keep)
    torch.testing.assert_close(stats["mass"][..., 1], plain_stats["mass"][..., 1] - moved)
    assert (out - plain_out).abs().max() > 1e-3  # the edit did something
    assert_matches_reference(case, num_splits=3, block_t=BLOCK)


# ---- the full grid (python -m pytest -m kernel_grid) --------------------------------------------------

SHAPES = list(itertools.product([1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5], [1, 4, 8], [1, 3], [64, 128]))
FLAG_GRID = [
    Flags(*values)
    for values in itertools.product(
        [False, True],
        ["", "row", "head"],
        ["", "head"],
        ["", "explicit"],
        ["", "plain", "gated"],
        [False, True],
        [False, True],
        [False, True],
    )
]


@pytest.mark.kernel_grid
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("kv_len", "group", "batch", "head_dim"), SHAPES)
def test_kernel_grid_shapes(kv_len, group, batch, head_dim, dtype):
    case = make_case(batch, 8, 8 // group, 1, kv_len, head_dim, dtype, ALL_ON, seed=kv_len + group)
    assert_matches_reference(case, num_splits=2, block_t=BLOCK)


@pytest.mark.kernel_grid
@pytest.mark.parametrize("flags", FLAG_GRID, ids=str)
def test_kernel_grid_flags(flags):
    case = make_case(1, 4, 2, 2 if flags.mask else 1, 2 * BLOCK + 1, 64, torch.float32, flags, seed=13)
    assert_matches_reference(case, num_splits=2, block_t=BLOCK)


def test_kernel_launches_are_counted_one_per_kernel_run():
    from halluguard.kernels.decode_attention import KERNELS, counting_launches, decode_attention

    case = make_case(1, 4, 2, 1, 20, 16, torch.float32, Flags())
    with counting_launches() as launches:
        decode_attention(**case)
        assert launches[0] == 2  # the partial sums, then their merge
        decode_attention(**dict(case, head_rows=True))
        assert launches[0] == 5  # and the head rows' kernel
    decode_attention(**case)
    assert launches[0] == 5 and all(not kernel.pre_run_hooks for kernel in KERNELS)  # counted inside only


def test_kernel_workspace_keeps_conversions_and_buffers_without_changing_results():
    """Calls of the same shapes share the kept buffers and conversions: a second call on other
    inputs, and a third on the first call's edit tensors, each equal a call without a workspace."""
    from halluguard.attention.derived import Derived
    from halluguard.kernels.decode_attention import decode_attention

    workspace = Derived()
    first = make_case(2, 4, 2, 1, 2 * BLOCK + 3, 64, torch.float32, ALL_ON, seed=5)
    second = make_case(2, 4, 2, 1, 2 * BLOCK + 3, 64, torch.float32, ALL_ON, seed=6)
    third = dict(first, query=second["query"], key=second["key"], value=second["value"])
    results = []
    for case in (first, second, third):
        kept = decode_attention(**case, num_splits=2, block_t=BLOCK, workspace=workspace)
        fresh = decode_attention(**case, num_splits=2, block_t=BLOCK)
        torch.testing.assert_close(kept[0], fresh[0], rtol=0, atol=0)
        assert set(kept[1]) == set(fresh[1]) and all(torch.equal(kept[1][k], fresh[1][k]) for k in kept[1])
        results.append(kept)
    assert not torch.equal(results[0][0], results[1][0])  # the inputs differ, so must the outputs
    assert results[0][1]["mass"].data_ptr() != results[2][1]["mass"].data_ptr()  # statistics are the call's own
    assert workspace.kept("flags target") == 2  # the first and second case's: the third's is the first's


def test_kernel_workspace_plans_each_shape_and_setting_anew():
    """The kept plan and buffers follow each change a call can bring: the keys grow (a decode step),
    the batch, the query rows, the split count, the edits that need buffers come and go; every call
    equals one without a workspace, and the shapes seen before are planned once."""
    from halluguard.attention.derived import Derived
    from halluguard.kernels.decode_attention import decode_attention

    workspace = Derived(per_name=8)
    gated = Flags(redistribution="gated", groups=True)
    calls = [
        (make_case(1, 4, 2, 1, 2 * BLOCK + 3, 32, torch.float32, Flags()), 2),
        (make_case(1, 4, 2, 1, 2 * BLOCK + 4, 32, torch.float32, Flags()), 2),  # one key more
        (make_case(2, 4, 2, 1, 2 * BLOCK + 4, 32, torch.float32, Flags()), 2),  # a larger batch
        (make_case(2, 4, 2, 3, 2 * BLOCK + 4, 32, torch.float32, Flags(mask="causal")), 2),  # three query rows
        (make_case(2, 4, 2, 1, 2 * BLOCK + 4, 32, torch.float32, gated), 2),  # masses and group sums
        (make_case(2, 4, 2, 1, 2 * BLOCK + 4, 32, torch.float32, gated), 3),  # another split count
        (make_case(1, 4, 2, 1, 2 * BLOCK + 3, 32, torch.float32, Flags(), seed=1), 2),  # the first shape again
        (make_case(1, 4, 2, 1, 2 * BLOCK + 3, 32, torch.float32, Flags(groups=True)), 2),  # and group sums
        (make_case(2, 4, 2, 3, 2 * BLOCK + 4, 32, torch.float32, Flags()), 2),  # the fourth's, first row implied
    ]
    for case, splits in calls:
        kept = decode_attention(**case, num_splits=splits, block_t=BLOCK, workspace=workspace)
        fresh = decode_attention(**case, num_splits=splits, block_t=BLOCK)
        torch.testing.assert_close(kept[0], fresh[0], rtol=0, atol=0)
        assert all(torch.equal(kept[1][k], fresh[1][k]) for k in fresh[1])
    # plans: the fifth call's shapes are the third's and the seventh's and eighth's the first's (edits do
    # not change a plan); the ninth differs from the fourth in its first query row alone
    assert workspace.kept("kernel plan") == 6
    # buffers: the second call's keys fit the first's; the fifth and eighth need buffers for their
    # edits' sums, the sixth for its splits; the ninth has the fourth's rows
    assert workspace.kept("kernel buffers") == 6


def test_kernel_reads_only_the_calls_keys_of_longer_key_sets():
    case = make_case(2, 4, 2, 1, 2 * BLOCK + 3, 64, torch.float32, Flags(redistribution="gated"), seed=7)
    spec = case["redistribution"]
    longer = dataclasses.replace(
        spec,
        source=torch.nn.functional.pad(spec.source, (0, 9), value=True),
        target=torch.nn.functional.pad(spec.target, (0, 9), value=True),
        gate=torch.nn.functional.pad(spec.gate, (0, 9), value=True),
    )
    from halluguard.kernels.decode_attention import decode_attention

    want = decode_attention(**case, num_splits=2, block_t=BLOCK)
    got = decode_attention(**dict(case, redistribution=longer), num_splits=2, block_t=BLOCK)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert_matches_reference(dict(case, redistribution=longer), num_splits=2, block_t=BLOCK)
