"""VHR: per-row head selection from a text-only stream run in lock-step, then head reinforcement."""

import pytest
import torch
from probes import assert_batch_rows_equal_single_rows, assert_guard_keeps_tokens
from tiny_models import (
    BOI,
    EOI,
    IMAGE,
    VISION_END,
    VISION_START,
    build_model,
    family_params,
    make_inputs,
    row_inputs,
)

import halluguard as hg
from halluguard.adapters import adapter_for
from halluguard.decoding.layout import merge_rows, text_only_rows
from halluguard.methods.vhr.method import VHR, default_layers, head_divergence, select_heads

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
DROPPED = {IMAGE, VISION_START, VISION_END, BOI, EOI}  # image tokens and the delimiters configs name


def selection(model, inputs, cfg, forward=False, **generate_kwargs):
    """(VHD per layer, heads per layer) chosen by VHR during a guarded generate (or Guard.forward)."""
    vhd, heads = {}, {}

    def record(layer, values, chosen):
        vhd[layer], heads[layer] = values.clone(), chosen.clone()

    with hg.wrap(model, methods=VHR(cfg, on_select=record)) as guard, torch.no_grad():
        if forward:
            guard.forward(**inputs)
        else:
            model.generate(**inputs, **(generate_kwargs or GEN))
    return vhd, heads


def text_only_rows_of(adapter, inputs: dict) -> dict:
    """The text-only rows VHR's probe runs: the adapter's image tokens and delimiters dropped."""
    return text_only_rows(inputs, adapter.image_and_marker_mask(inputs["input_ids"]))


def with_text_only_rows(adapter, inputs: dict) -> dict:
    """The prompt's forward with the probe's rows appended, as the guarded call lays it out."""
    extra = text_only_rows_of(adapter, inputs)
    return merge_rows(
        inputs, extra, 0, positions_from_ids=adapter.positions_from_ids, row_image_inputs=adapter.row_image_inputs
    )


def text_only(row: dict) -> dict:
    """A separate text-only prompt: the row's ids without image tokens and delimiters, no images."""
    ids = row["input_ids"][0]
    keep = ~torch.isin(ids, torch.tensor(sorted(DROPPED)))
    ids = ids[keep][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for name in ("token_type_ids", "mm_token_type_ids"):
        if name in row:
            out[name] = torch.zeros_like(ids)
    return out


def brute_force_selection(model, row, layers, alpha, outlier_filter=True, reinforce_earlier=True):
    """VHD and heads per layer from two separate forwards per layer, hooks on the o_proj inputs.

    Layer by layer: both prompts run with the heads already chosen below (scaled by ``alpha`` at
    every position through an o_proj pre-hook, when ``reinforce_earlier``), and the o_proj input at
    the last position gives each head's output at the layer being chosen."""
    adapter = adapter_for(model)
    heads_n, dim = adapter.num_heads, adapter.head_dim
    chosen, divergence = {}, {}
    for layer in layers:
        captured = []

        def hook(module, args, layer_idx, layer=layer, captured=captured):
            x = args[0]
            if layer_idx == layer:
                captured.append(x[0, -1].reshape(heads_n, dim).float().clone())
            if reinforce_earlier and layer_idx in chosen:
                scale = torch.where(chosen[layer_idx], alpha, 1.0).repeat_interleave(dim).to(x.dtype)
                return (x * scale,)
            return None

        handles = [
            attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: hook(m, a, i))
            for i, attn in enumerate(adapter.attention_modules())
        ]
        try:
            with torch.no_grad():
                model(**row)
                model(**text_only(row))
        finally:
            for h in handles:
                h.remove()
        with_image, without = captured
        divergence[layer] = head_divergence(with_image[None], without[None], outlier_filter)[0]
        chosen[layer] = select_heads(divergence[layer][None])[0]
    return divergence, chosen


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "idefics3", "gemma3", "paligemma"])
def test_vhd_and_heads_equal_a_brute_force_with_two_separate_forwards(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    cfg = hg.VHRConfig(alpha=3.0, layers=(0, 1, 2))
    vhd, heads = selection(model, inputs, cfg)
    assert sorted(vhd) == [0, 1, 2]
    for r in range(inputs["input_ids"].shape[0]):
        want_vhd, want_heads = brute_force_selection(model, row_inputs(inputs, r, family), (0, 1, 2), 3.0)
        for layer in (0, 1, 2):
            torch.testing.assert_close(vhd[layer][r], want_vhd[layer], rtol=1e-4, atol=1e-5)
            assert torch.equal(heads[layer][r], want_heads[layer]), (r, layer)
            assert int(heads[layer][r].sum()) >= 1


def test_selection_sees_earlier_layers_reinforced_and_the_filter_matters():
    """The brute force discriminates: without lock-step reinforcement the later VHD values differ."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    row = row_inputs(inputs, 0, "llava")
    vhd, _ = selection(model, inputs, hg.VHRConfig(alpha=3.0, layers=(0, 1, 2)))
    unreinforced, _ = brute_force_selection(model, row, (0, 1, 2), 3.0, reinforce_earlier=False)
    torch.testing.assert_close(vhd[0][0], unreinforced[0])  # nothing below layer 0
    assert (vhd[2][0] - unreinforced[2]).abs().max() > 1e-3
    unfiltered, _ = selection(model, inputs, hg.VHRConfig(alpha=3.0, layers=(0, 1, 2), outlier_filter=False))
    want, _ = brute_force_selection(model, row, (0, 1, 2), 3.0, outlier_filter=False)
    torch.testing.assert_close(unfiltered[2][0], want[2], rtol=1e-4, atol=1e-5)


def test_outlier_filter_and_median_selection_by_hand():
    with_image = torch.zeros(1, 6, 2)
    without = torch.zeros(1, 6, 2)
    with_image[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 30.0])
    without[0, 5, 1] = 40.0  # head 5 surges without the image: large VHD and large TA
    vhd = head_divergence(with_image, without)
    assert vhd[0, 5] == 0 and vhd[0, 4] == 5.0
    assert select_heads(vhd)[0].tolist() == [False, False, True, True, True, False]  # median of 0..5 is 2
    assert head_divergence(with_image, without, outlier_filter=False)[0, 5] > 40
    assert select_heads(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))[0].tolist() == [False, False, True, True]


def test_default_layers_follow_the_paper_at_32_layers_and_scale_with_depth():
    assert default_layers(32) == (1, *range(18, 32))
    assert default_layers(32, include_layer1=False) == tuple(range(18, 32))
    assert default_layers(40) == (1, *range(22, 40))  # round(14 * 40 / 32) = 18 last layers
    assert default_layers(3) == (1, 2)
    assert default_layers(1) == (0,)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_fixed_heads_equal_scaled_o_proj_columns(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    adapter = adapter_for(model)
    fixed = {1: [0, 2], 2: [3]}
    with torch.no_grad():
        with hg.wrap(model, methods=hg.VHRConfig(alpha=2.0, fixed_heads=fixed)) as guard:
            got = guard.forward(**inputs).logits
            got_tokens = model.generate(**inputs, **GEN)
        saved = {layer: adapter.attention_modules()[layer].o_proj.weight.clone() for layer in fixed}
        for layer, heads in fixed.items():
            weight = adapter.attention_modules()[layer].o_proj.weight
            for h in heads:
                weight[:, h * adapter.head_dim : (h + 1) * adapter.head_dim] *= 2.0
        want = model(**inputs).logits
        want_tokens = model.generate(**inputs, **GEN)
        for layer, weight in saved.items():
            adapter.attention_modules()[layer].o_proj.weight.copy_(weight)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(got_tokens, want_tokens)


def test_generation_uses_the_selected_heads_at_every_step():
    """Generating with the selected heads given as fixed heads reproduces the selection run."""
    model = build_model("qwen2_vl")
    inputs, _ = make_inputs(model, "qwen2_vl", batch=1)
    cfg = hg.VHRConfig(alpha=3.0, layers=(1, 2))
    _, heads = selection(model, inputs, cfg)
    fixed = {layer: h[0].nonzero().flatten().tolist() for layer, h in heads.items()}
    with torch.no_grad():
        with hg.wrap(model, methods=cfg):
            selected = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=hg.VHRConfig(alpha=3.0, fixed_heads=fixed)):
            replayed = model.generate(**inputs, **GEN)
        plain = model.generate(**inputs, **GEN)
    assert torch.equal(selected, replayed)
    assert not torch.equal(selected, plain)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "smolvlm"])
def test_batch_rows_equal_single_rows(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    with hg.wrap(model, methods=hg.VHRConfig(alpha=3.0, layers=(0, 1, 2))):
        assert_batch_rows_equal_single_rows(model, inputs, family, GEN)


def test_greedy_beam_and_sampling_run_and_strong_vhr_changes_outputs():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with torch.no_grad():
        plain = [model.generate(**inputs, **GEN), model.generate(**inputs, **GEN, num_beams=3)]
        with hg.wrap(model, methods=hg.VHRConfig(alpha=4.0, layers=(0, 1, 2))):
            edited = [model.generate(**inputs, **GEN), model.generate(**inputs, **GEN, num_beams=3)]
            torch.manual_seed(0)
            sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    assert any(not torch.equal(a, b) for a, b in zip(plain, edited))
    assert sampled.shape == (4, inputs["input_ids"].shape[1] + 6)


def test_text_only_rows_drop_images_and_delimiters_and_count_positions_from_zero():
    model = build_model("qwen2_vl")
    inputs, _ = make_inputs(model, "qwen2_vl")
    paired = with_text_only_rows(
        adapter_for(model), dict(inputs, position_ids=torch.zeros(4, 2, inputs["input_ids"].shape[1], dtype=torch.long))
    )
    for r in range(2):
        row = row_inputs(inputs, r, "qwen2_vl")
        want = text_only(row)["input_ids"][0]
        n = want.shape[0]
        text_row = paired["input_ids"][2 + r]
        assert torch.equal(text_row[-n:], want)
        assert paired["attention_mask"][2 + r].sum() == n and paired["attention_mask"][2 + r, -n:].all()
        assert paired["mm_token_type_ids"][2 + r].sum() == 0
        assert paired["position_ids"][:, 2 + r, -n:].tolist() == [list(range(n))] * 4
    assert torch.equal(paired["input_ids"][:2], inputs["input_ids"])
    assert torch.equal(paired["pixel_values"], inputs["pixel_values"])
    idefics = build_model("idefics3")
    inputs, _ = make_inputs(idefics, "idefics3")
    paired = with_text_only_rows(adapter_for(idefics), inputs)
    assert paired["pixel_values"].shape[0] == 4 and paired["pixel_values"][2:].abs().sum() == 0


def test_vhr_errors():
    model = build_model("llava")
    with pytest.raises(ValueError, match="outside the model"):
        hg.wrap(model, methods=hg.VHRConfig(fixed_heads={1: [9]}))
    with pytest.raises(ValueError, match="outside the model"):
        hg.wrap(model, methods=hg.VHRConfig(layers=(5,)))
    assert not hasattr(model, "_halluguard_guard")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods="vhr"), pytest.raises(ValueError, match="whole prompt"):
        model.generate(**inputs, **GEN, prefill_chunk_size=4)
    right, _ = make_inputs(model, "llava", padding_side="right")
    with hg.wrap(model, methods="vhr") as guard, pytest.raises(ValueError, match="pad on the left"):
        guard.forward(**right)
    with (
        hg.wrap(model, methods=hg.PAIConfig(use_cfg=False)) as guard,
        pytest.raises(ValueError, match="pad on the left"),
    ):
        guard.forward(**right)
    cfg = hg.VHRConfig.from_json('{"fixed_heads": {"1": [0, 1]}}')
    assert cfg.fixed_heads == {1: (0, 1)}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_guarded_forward_selects_like_generate(family):
    """Without generate's position ids the probe numbers positions itself, with the same result."""
    model = build_model(family)
    inputs, _ = make_inputs(model, family, batch=1)
    cfg = hg.VHRConfig(alpha=3.0, layers=(0, 1, 2))
    want_vhd, want_heads = selection(model, inputs, cfg)
    got_vhd, got_heads = selection(model, inputs, cfg, forward=True)
    for layer in want_vhd:
        torch.testing.assert_close(got_vhd[layer], want_vhd[layer], rtol=1e-4, atol=1e-5)
        assert torch.equal(got_heads[layer], want_heads[layer])


def test_vhr_composes_with_attention_edits():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    assert_guard_keeps_tokens(model, inputs, [hg.VHRConfig.neutral(), hg.PAIConfig.neutral()], GEN)
    with hg.wrap(model, methods="vhr+pai"), torch.no_grad():
        out = model.generate(**inputs, **GEN)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6


@pytest.mark.parametrize("family", family_params())
def test_vhr_var_and_pai_guidance_run_together_on_every_family(family):
    """VHR's probe, VAR's redistribution (a low sink threshold on two dimensions) and PAI's
    image-free side stream together: greedy, sampling and beam search."""
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    methods = [
        hg.VHRConfig(alpha=2.0),
        hg.VARConfig(sink_dims=(0, 1), tau=1.5, first_layer=0),
        hg.PAIConfig(alpha=0.5, use_cfg=True),
    ]
    length = inputs["input_ids"].shape[1] + 4
    with hg.wrap(model, methods=methods), torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=4, min_new_tokens=4).shape == (2, length)
        torch.manual_seed(0)
        assert model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True).shape == (2, length)
        assert model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=2).shape == (2, length)


def test_vhr_with_a_static_cache_selects_like_a_dynamic_one():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    cfg = hg.VHRConfig(alpha=3.0, layers=(0, 1, 2))
    with hg.wrap(model, methods=cfg), torch.no_grad():
        dynamic = model.generate(**inputs, **GEN)
        static = model.generate(**inputs, **GEN, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_var_with_pai_guidance_and_vhr_compose():
    """VAR's residual-stream reads stay out of PAI's image-free stream (it runs without methods)."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    methods = [hg.VARConfig(sink_dims=(0, 1), tau=1.5), hg.PAIConfig(use_cfg=True), hg.VHRConfig()]
    with hg.wrap(model, methods=methods), torch.no_grad():
        out = model.generate(**inputs, **GEN, num_beams=2)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6


def test_idefics_wrapper_tokens_come_from_the_processor():
    class Tokenizer:
        def get_vocab(self):
            return {"<fake_token_around_image>": 504, "<global-img>": 505, "<row_1_col_1>": 508, "hello": 7}

    class Processor:
        tokenizer = Tokenizer()
        fake_image_token = "<fake_token_around_image>"
        global_image_tag = "<global-img>"

    model = build_model("idefics3")
    adapter = adapter_for(model, Processor())
    assert adapter.processor_marker_ids == (504, 505, 508)
    inputs, _ = make_inputs(model, "idefics3", batch=1)
    text = text_only_rows_of(adapter, inputs)["input_ids"][0]
    assert not torch.isin(text, torch.tensor([IMAGE, 504, 505])).any()
    assert torch.isin(text_only_rows_of(adapter_for(model), inputs)["input_ids"][0], torch.tensor([504, 505])).any()
