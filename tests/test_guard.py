"""wrap / unwrap and the attention hook on tiny models of every supported family.

Identities: the hook with no edits equals SDPA; wrap + unwrap restores logits bit-for-bit; a guard
with no edits (or with neutral edits that force the reference path) gives the same greedy, beam
and sampled tokens as the plain model, batch 2 with left padding included.
"""

import copy
import warnings

import pytest
import torch
from probes import Probe, assert_batch_rows_equal_single_rows, reference_everywhere, stats_only
from safetensors.torch import save_file
from tiny_models import build_model, family_params, make_inputs

import halluguard as hg
from halluguard.api import GUARD_ATTRIBUTE
from halluguard.attention import AttentionEdit, Reductions

GEN = dict(max_new_tokens=6, min_new_tokens=6)


def model_and_inputs(family, batch=2):
    """A fresh model per test (building one takes milliseconds), so no test sees another's leftovers."""
    model = build_model(family)
    return model, make_inputs(model, family, batch=batch)[0]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **GEN, **kwargs)


@pytest.mark.parametrize("family", family_params())
def test_hook_reference_path_matches_sdpa(family):
    model, inputs = model_and_inputs(family)
    want = logits(model, inputs)
    probe = Probe(reference_everywhere)
    with hg.wrap(model, methods=[probe]) as guard, torch.no_grad():
        got = guard.forward(**inputs).logits
        plain = model(**inputs).logits  # outside a guarded call: the base attention
    real = inputs["attention_mask"].bool()
    assert probe.records, "the reference path was not taken"
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(plain, want)


@pytest.mark.parametrize("family", family_params())
def test_wrap_unwrap_restores_the_model_bit_for_bit(family):
    model, inputs = model_and_inputs(family)
    before = logits(model, inputs)
    config_before = model.config.to_dict()
    attn_before = model.config.text_config._attn_implementation
    scale = Probe(lambda state, call: AttentionEdit(head_scale=torch.full((call.batch, call.num_heads), 3.0)))
    guard = hg.wrap(model, methods=[scale])
    edited = guard.forward(**inputs).logits.detach()
    generate(model, inputs)
    assert not torch.allclose(edited, before), "the edit had no effect, so this test proves nothing"
    assert guard.unwrap() is model
    assert torch.equal(logits(model, inputs), before)
    assert model.config.to_dict() == config_before
    assert model.config.text_config._attn_implementation == attn_before
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__
    assert not hasattr(model, GUARD_ATTRIBUTE)
    assert not model._forward_pre_hooks
    assert not any(hasattr(m, GUARD_ATTRIBUTE) for m in model.modules())


@pytest.mark.parametrize("family", family_params())
@pytest.mark.parametrize("methods", ["none", "reference", "stats"])
def test_greedy_and_beam_tokens_identical_without_edits(family, methods):
    model, inputs = model_and_inputs(family)
    want_greedy = generate(model, inputs, do_sample=False)
    want_beam = generate(model, inputs, do_sample=False, num_beams=3)
    method = {"none": [], "reference": [Probe(reference_everywhere)], "stats": [Probe(stats_only)]}[methods]
    with hg.wrap(model, methods=method):
        assert torch.equal(generate(model, inputs, do_sample=False), want_greedy)
        assert torch.equal(generate(model, inputs, do_sample=False, num_beams=3), want_beam)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_sampling_identical_without_edits(family):
    model, inputs = model_and_inputs(family)
    torch.manual_seed(7)
    want = generate(model, inputs, do_sample=True, top_k=0, temperature=1.0)
    with hg.wrap(model, methods=[Probe(reference_everywhere)]):
        torch.manual_seed(7)
        assert torch.equal(generate(model, inputs, do_sample=True, top_k=0, temperature=1.0), want)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_batch_rows_equal_single_rows_under_edits(family):
    """An edit keyed to each row's own image span gives each row the tokens it gets alone."""
    model, inputs = model_and_inputs(family)

    def damp_image(state, call):
        image = state.group_masks(call)["image"]
        return AttentionEdit(key_bias=image.float() * -2.0)

    with hg.wrap(model, methods=[Probe(damp_image)]):
        assert_batch_rows_equal_single_rows(model, inputs, family, dict(GEN, do_sample=False))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "smolvlm"])
def test_head_scale_equals_scaled_o_proj_columns(family):
    """Scaling head 2 of layer 1 by 3 is the same as scaling its o_proj input columns by 3."""
    model, inputs = model_and_inputs(family)
    head_dim = hg.adapters.adapter_for(model).head_dim

    def scale_head(state, call):
        if call.layer_idx != 1:
            return None
        scale = torch.ones(call.batch, call.num_heads)
        scale[:, 2] = 3.0
        return AttentionEdit(head_scale=scale)

    with hg.wrap(model, methods=[Probe(scale_head)]) as guard, torch.no_grad():
        got = guard.forward(**inputs).logits
    edited = copy.deepcopy(model)
    o_proj = hg.adapters.adapter_for(edited).attention_modules()[1].o_proj
    with torch.no_grad():
        o_proj.weight[:, 2 * head_dim : 3 * head_dim] *= 3.0
    want = logits(edited, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_key_bias_masking_image_keys_equals_attention_mask():
    """A -inf key bias on image keys equals zeroing those keys in the attention mask (LLaVA)."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")

    def hide_image(state, call):
        image = state.group_masks(call)["image"]
        return AttentionEdit(key_bias=torch.zeros(image.shape).masked_fill(image, float("-inf")))

    with hg.wrap(model, methods=[Probe(hide_image)]) as guard, torch.no_grad():
        got = guard.forward(**inputs).logits
    masked = dict(inputs, attention_mask=inputs["attention_mask"] * (inputs["input_ids"] != 500))
    want = logits(model, masked)
    text = masked["attention_mask"].bool()
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_reductions_equal_eager_attention_weights(family):
    """Group masses and the head-max row from the hook equal sums over eager attention maps."""
    model = build_model(family)
    eager = build_model(family, attn_implementation="eager")
    inputs, _ = make_inputs(model, family)
    with torch.no_grad():
        maps = eager(**inputs, output_attentions=True).attentions  # per layer (B, H, T, T)
    probe = Probe(
        lambda state, call: AttentionEdit(reductions=Reductions(dict(state.group_masks(call)), headmax_from_key=4))
    )
    with hg.wrap(model, methods=[probe]) as guard, torch.no_grad():
        guard.forward(**inputs)
    image = (inputs["input_ids"] == 500) & inputs["attention_mask"].bool()
    context = inputs["attention_mask"].bool()
    assert len(probe.records) == len(maps)
    for call, stats in probe.records:
        last = maps[call.layer_idx][:, :, -1]  # (B, H, T)
        torch.testing.assert_close(stats["mass/image"], (last * image[:, None]).sum(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats["mass/context"], (last * context[:, None]).sum(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats["headmax_row"], last.amax(1)[:, 4:], atol=1e-5, rtol=1e-5)


def test_decode_stats_cover_every_step_and_fresh_state_per_call():
    model, inputs = model_and_inputs("llava")
    probe = Probe(stats_only)
    states = []
    probe.on_prompt = states.append
    with hg.wrap(model, methods=[probe]) as guard:
        generate(model, inputs)
        assert guard.state is None
        generate(model, inputs)
    assert len(states) == 2 and states[0] is not states[1]
    layers = 3
    # prefill + (max_new_tokens - 1) decode forwards, twice
    assert len(probe.records) == 2 * layers * GEN["max_new_tokens"]
    decode = [c for c, _ in probe.records if not c.is_prefill]
    assert all(c.q_len == 1 for c in decode)
    prompt = inputs["input_ids"].shape[1]
    assert sorted({c.kv_len for c in decode}) == list(range(prompt + 1, prompt + GEN["max_new_tokens"]))


def test_eager_models_keep_eager_for_unedited_calls():
    model = build_model("llava", attn_implementation="eager")
    inputs, _ = make_inputs(model, "llava")
    want = generate(model, inputs, do_sample=False)
    want_logits = logits(model, inputs)
    with hg.wrap(model, methods=[Probe(stats_only)]) as guard:
        assert guard.base_attention == "eager"
        assert torch.equal(generate(model, inputs, do_sample=False), want)
        with torch.no_grad():
            got = guard.forward(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want_logits[real], atol=1e-5, rtol=1e-5)
    assert model.config.text_config._attn_implementation == "eager"


def test_right_padding_is_refused_with_a_clear_error():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", padding_side="right")
    with hg.wrap(model, methods=[Probe(stats_only)]), pytest.raises(ValueError, match="left padding"):
        generate(model, inputs)


def test_wrapping_twice_is_an_error_and_context_manager_unwraps_on_error():
    model, inputs = model_and_inputs("llava")
    before = logits(model, inputs)
    with pytest.raises(RuntimeError, match="boom"), hg.wrap(model, methods=[]):
        with pytest.raises(ValueError, match="already wrapped"):
            hg.wrap(model, methods=[])
        raise RuntimeError("boom")
    assert not hasattr(model, GUARD_ATTRIBUTE)
    assert torch.equal(logits(model, inputs), before)
    guard = hg.wrap(model, methods=[])
    guard.unwrap()
    guard.unwrap()  # idempotent
    with pytest.raises(RuntimeError, match="unwrapped"):
        guard.generate(**inputs)


def test_sliding_window_cache_maps_keys_to_positions():
    """Gemma 3 with a short sliding window: decode-step image masses on truncated caches equal eager maps."""
    model = build_model("gemma3")
    eager = build_model("gemma3", attn_implementation="eager")
    for m in (model, eager):
        m.config.text_config.sliding_window = 16
    inputs, _ = make_inputs(model, "gemma3")
    with torch.no_grad():
        ref = eager.generate(**inputs, **GEN, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    probe = Probe(stats_only)
    with hg.wrap(model, methods=[probe]):
        tokens = generate(model, inputs, do_sample=False)
    assert torch.equal(tokens, ref.sequences)
    prompt = inputs["input_ids"].shape[1]
    image = (inputs["input_ids"] == 500) & inputs["attention_mask"].bool()
    truncated, partial_image = 0, False
    for call, stats in probe.records:
        if call.is_prefill:
            continue
        step = call.kv_len + call.key_offset - prompt  # 1 for the first decode forward
        weights = ref.attentions[step][call.layer_idx][:, :, -1]  # (B, H, kv_len)
        assert weights.shape[-1] == call.kv_len
        positions = torch.arange(call.key_offset, call.key_offset + call.kv_len)
        on_image = torch.zeros(image.shape[0], call.kv_len, dtype=torch.bool)
        inside = positions < prompt
        on_image[:, inside] = image[:, positions[inside]]
        torch.testing.assert_close(stats["mass/image"], (weights * on_image[:, None]).sum(-1), atol=1e-5, rtol=1e-5)
        if call.key_offset > 0:
            truncated += 1
            partial_image |= bool(on_image.any()) and not bool(on_image.all(-1).any())
    assert truncated, "no call saw a truncated cache, so the offset was not exercised"
    assert partial_image, "no truncated window cut through the image, so the offset was not exercised"


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_an_empty_prompt_is_refused_clearly(shape):
    model = build_model("llava")
    empty = torch.zeros(shape, dtype=torch.long)
    with hg.wrap(model, methods="vhr") as guard, pytest.raises(ValueError, match="a guarded call needs a prompt"):
        guard.generate(input_ids=empty, attention_mask=torch.ones_like(empty), max_new_tokens=2)
    with hg.wrap(model, methods="vhr") as guard, pytest.raises(ValueError, match="a guarded call needs a prompt"):
        guard.forward(input_ids=empty)


@pytest.mark.parametrize("name", hg.list_methods(available_only=True))
def test_a_call_past_the_models_positions_warns_once_for_every_method(name, tmp_path):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    model.config.get_text_config().max_position_embeddings = inputs["input_ids"].shape[1] + 3
    text = model.config.get_text_config()
    save_file({"text": torch.ones(text.num_hidden_layers, text.hidden_size)}, str(tmp_path / "vti.safetensors"))
    settings = {
        "var": dict(sink_dims=(5, 9), tau=1.8),
        "decore": dict(retrieval_heads={"0-0": [1.0]}),
        "icd": dict(prefix_ids=(40, 41)),
        "vti": dict(directions=str(tmp_path / "vti.safetensors"), alpha_image=0.0),
    }.get(name, {})
    beams = 2 if name == "opera" else 1
    with hg.wrap(model, methods=hg.get_config(name, **settings)):
        with pytest.warns(UserWarning, match=r"past the \d+ positions the model was trained on"):
            model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=beams)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per guard
            model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=beams)
    with hg.wrap(model, methods=hg.get_config(name, **settings)), warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=beams)  # within: no warning
