"""Which path runs a call (``HALLUGUARD_KERNEL``), which edits fold into the kernel, and generation
through the kernel end to end (under the Triton interpreter on CPU) giving the reference path's
tokens, statistics and OPERA's look-ahead included."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, make_inputs

import halluguard as hg
from halluguard.attention import dispatch
from halluguard.attention.edits import AttentionEdit, Redistribution, Reductions
from halluguard.kernels._compat import HAS_TRITON, interpreting

needs_kernel = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or interpreting()),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
TEST_VAR = dict(sink_dims=(5, 9), tau=1.8, rho=0.9, summ=0.2, p=0.3, first_layer=1)


def test_kernel_mode_is_read_and_checked(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.kernel_mode() == "auto"
    assert not dispatch.use_kernel(torch.device("cpu"))  # auto: CUDA only
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert not dispatch.use_kernel(torch.device("cpu"))
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(ValueError, match="HALLUGUARD_KERNEL='cuda' is not a mode; use one of auto, triton"):
        dispatch.use_kernel(torch.device("cpu"))


@needs_kernel
def test_kernel_forced_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_kernel(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs the Triton interpreter: set TRITON_INTERPRET=1"):
        dispatch.use_kernel(torch.device("cpu"))


def _fold(edits, rows=1, mask=None, reductions=None):
    reductions = reductions if reductions is not None else [None] * len(edits)
    return dispatch.fold(
        edits, reductions, rows=rows, mask=mask, causal=True, kv_len=8, first_row=8 - rows, device=torch.device("cpu")
    )


def test_kernel_fold_takes_the_edits_it_can_compute():
    bias_a, bias_b, boost = torch.randn(2, 8), torch.randn(2, 4, 8), torch.rand(2, 8)
    call = _fold([AttentionEdit(key_boost=boost, key_bias=bias_a), AttentionEdit(key_bias=bias_b)])
    assert call.arguments["key_boost"] is boost
    torch.testing.assert_close(call.arguments["key_bias"], bias_a[:, None] + bias_b)
    causal = _fold([AttentionEdit(key_bias=bias_a)], rows=3)
    assert causal.arguments["allowed"].shape == (1, 3, 8)  # causal rows, ending at the last key
    assert causal.arguments["allowed"][0, 0].tolist() == [True] * 6 + [False] * 2
    lookback = Reductions(group_masses={"image": torch.ones(2, 8, dtype=torch.bool)})
    opera = Reductions(headmax_from_key=4)
    call = _fold([AttentionEdit(reductions=lookback), AttentionEdit(reductions=opera)], reductions=[lookback, opera])
    assert call.groups == [(0, "image")] and call.arguments["head_rows"]


@pytest.mark.parametrize(
    "edits",
    [
        [AttentionEdit(key_boost=torch.rand(2, 8)), AttentionEdit(key_boost=torch.rand(2, 8))],
        [AttentionEdit(key_bias=torch.rand(2, 8)), AttentionEdit(key_boost=torch.rand(2, 8))],
        [
            AttentionEdit(redistribution=Redistribution(torch.rand(2, 8) < 0.5, torch.rand(2, 8) < 0.5, 0.5)),
            AttentionEdit(redistribution=Redistribution(torch.rand(2, 8) < 0.5, torch.rand(2, 8) < 0.5, 0.5)),
        ],
    ],
    ids=["two boosts", "bias before a boost", "two redistributions"],
)
def test_kernel_fold_refuses_what_it_cannot_compute(edits):
    assert _fold(edits) is None


def test_kernel_fold_refuses_many_rows_last_row_edits_and_per_head_masks():
    bias = AttentionEdit(key_bias=torch.randn(2, 8))
    assert _fold([bias], rows=dispatch.KERNEL_MAX_ROWS + 1) is None
    assert _fold([AttentionEdit(key_bias=torch.randn(2, 8), last_row_only=True)], rows=2) is None
    assert _fold([bias], rows=2, mask=torch.ones(2, 4, 2, 8, dtype=torch.bool)) is None
    assert _fold([bias], rows=2, mask=torch.ones(2, 1, 2, 8, dtype=torch.bool)) is not None


def _model_and_inputs(batch):
    model = build_model("llava").to(DEVICE)
    inputs, _ = make_inputs(model, "llava", batch=batch)
    return model, {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}


def _generate(model, inputs, methods, mode, monkeypatch, **gen):
    monkeypatch.setenv(dispatch.ENV, mode)
    launches = []
    run = dispatch.run_kernel
    monkeypatch.setattr(dispatch, "run_kernel", lambda *a, **k: launches.append(1) or run(*a, **k))
    with torch.no_grad(), hg.wrap(model, methods=methods) as guard:
        out = model.generate(**inputs, **gen, return_dict_in_generate=True, output_scores=True)
    return out, guard, len(launches)


CASES = {
    "var": lambda: hg.VARConfig(**TEST_VAR),
    "pai": lambda: hg.PAIConfig(alpha=0.8, start_layer=0, use_cfg=False),
    "vhr+var": lambda: [hg.get_config("vhr"), hg.VARConfig(**TEST_VAR)],
    "lookback": lambda: hg.get_config("lookback"),
}


@needs_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_generation_gives_the_reference_tokens(name, monkeypatch):
    model, inputs = _model_and_inputs(batch=2)
    ref, ref_guard, none = _generate(model, inputs, CASES[name](), "reference", monkeypatch, **GEN)
    got, guard, launches = _generate(model, inputs, CASES[name](), "triton", monkeypatch, **GEN)
    assert none == 0 and launches > 0
    assert torch.equal(got.sequences, ref.sequences)
    for ours, theirs in zip(got.scores, ref.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    if name == "lookback":
        for ours, theirs in zip(guard.results["lookback"], ref_guard.results["lookback"]):
            torch.testing.assert_close(ours.features, theirs.features, rtol=0, atol=1e-5)


@needs_kernel
def test_kernel_runs_opera_lookahead_rows(monkeypatch):
    model, inputs = _model_and_inputs(batch=1)
    gen = dict(max_new_tokens=4, num_beams=2)
    opera = lambda: hg.get_config("opera", num_attn_candidates=2)
    ref, _, _ = _generate(model, inputs, opera(), "reference", monkeypatch, **gen)
    got, _, launches = _generate(model, inputs, opera(), "triton", monkeypatch, **gen)
    assert launches > 0
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.sequences_scores, ref.sequences_scores, rtol=0, atol=1e-4)
