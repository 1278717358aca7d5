"""Positions, composition and precision: the guard under the less common ways of calling generate."""

import pytest
import torch
from probes import Probe, reference_everywhere, stats_only
from tiny_models import build_model, make_inputs

import halluguard as hg
from halluguard import compat
from halluguard.attention import AttentionEdit, Redistribution, Reductions

IMAGE = 500


def mask_recorder(records):
    def edit(state, call):
        masks = state.group_masks(call)
        records.append((call, {k: v.clone() for k, v in masks.items()}, state.seen_tokens))
        return AttentionEdit(reductions=Reductions({"image": masks["image"]}))

    return edit


def check_masks(records, input_ids, attention_mask):
    """Every call's key groups name exactly the tokens its cache keys hold."""
    prompt_len = input_ids.shape[1]
    image = (input_ids == IMAGE) & attention_mask.bool()
    for call, masks, seen in records:
        positions = torch.arange(call.key_offset, call.key_offset + call.kv_len)
        held = positions < seen
        in_prompt = held & (positions < prompt_len)
        want_image = torch.zeros(image.shape[0], call.kv_len, dtype=torch.bool)
        want_image[:, in_prompt] = image[:, positions[in_prompt]]
        assert torch.equal(masks["image"][: image.shape[0]], want_image), call
        want_generated = held & (positions >= prompt_len)
        assert torch.equal(masks["generated"][0], want_generated), call
        assert call.is_prefill == (call.query_start < prompt_len)


@pytest.mark.parametrize("mode", ["plain", "chunked_prefill", "static_cache", "prompt_lookup"])
def test_key_groups_follow_the_cache(mode):
    model = build_model("llava")
    batch = 1 if mode == "prompt_lookup" else 2
    inputs, _ = make_inputs(model, "llava", batch=batch)
    extra = {
        "plain": {},
        "chunked_prefill": {"prefill_chunk_size": 8},
        "static_cache": {"cache_implementation": "static"},
        "prompt_lookup": {"prompt_lookup_num_tokens": 2},
    }[mode]
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=6, do_sample=False, **extra)
    records = []
    with hg.wrap(model, methods=[Probe(mask_recorder(records))]), torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=6, do_sample=False, **extra)
    assert torch.equal(got, want)
    assert records
    check_masks(records, inputs["input_ids"], inputs["attention_mask"])
    if mode == "static_cache":
        assert any(c.kv_len > seen for c, _, seen in records), "the static cache was not exercised"
    if mode == "chunked_prefill":
        assert sum(c.is_prefill and c.layer_idx == 0 for c, _, _ in records) > 1


def test_continuing_from_an_earlier_cache():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    ids = torch.cat([first.sequences, torch.tensor([[11, 12, 13]])], 1)
    records = []
    with hg.wrap(model, methods=[Probe(mask_recorder(records))]), torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **{compat.CACHE: compat.cache_of(first)},
            max_new_tokens=3,
            do_sample=False,
        )
    assert records[0][0].query_start > 0
    check_masks(records, ids, torch.ones_like(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_never_change_the_output(dtype):
    model = build_model("llava").to(dtype)
    inputs, _ = make_inputs(model, "llava")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        want_logits = model(**inputs).logits
        want = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    probe = Probe(stats_only)
    with hg.wrap(model, methods=[probe]) as guard, torch.no_grad():
        assert torch.equal(guard.forward(**inputs).logits, want_logits)
        assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), want)
    assert probe.records


def test_query_mask_selects_the_same_row_with_and_without_last_row_only():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    plain = model(**inputs).logits.detach()

    def redistribute(last_row_only):
        def edit(state, call):
            masks = state.group_masks(call)
            sinks = masks["text"] & ~masks["image"]
            eligible = torch.zeros(call.batch, call.q_len, dtype=torch.bool)
            eligible[:, -1] = True
            return AttentionEdit(
                redistribution=Redistribution(sinks, masks["image"], keep=0.0, query_mask=eligible),
                last_row_only=last_row_only,
            )

        return edit

    results = []
    for last_row_only in (False, True):
        with hg.wrap(model, methods=[Probe(redistribute(last_row_only))]) as guard, torch.no_grad():
            results.append(guard.forward(**inputs).logits)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
    assert (results[1][:, -1] - plain[:, -1]).abs().max() > 1e-3


def test_composed_methods_get_their_own_statistics():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")

    def asking(group, start):
        def edit(state, call):
            masks = state.group_masks(call)
            return AttentionEdit(reductions=Reductions({"g": masks[group]}, headmax_from_key=call.kv_len - start))

        return edit

    a, b = Probe(asking("image", 3)), Probe(asking("text", 7))
    b.config = hg.VARConfig()  # a second, distinct method name
    with hg.wrap(model, methods=[a, b]) as guard, torch.no_grad():
        guard.forward(**inputs)
    for (_, sa), (_, sb) in zip(a.records, b.records):
        assert sa["headmax_row"].shape[-1] == 3 and sb["headmax_row"].shape[-1] == 7
        assert not torch.allclose(sa["mass/g"], sb["mass/g"])
        # image and text masses together are the mass on every real prompt key: 1 at the prefill
        torch.testing.assert_close(sa["mass/g"] + sb["mass/g"], torch.ones_like(sa["mass/g"]), atol=1e-5, rtol=0)


def test_an_empty_guard_is_a_no_op_for_every_call_form():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", padding_side="right")
    embeds = model.get_input_embeddings()(torch.tensor([[1, 20, 21, 22]]))
    with torch.no_grad():
        want = model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
        want_logits = model(**inputs).logits
        with hg.wrap(model, methods=[]) as guard:
            assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False), want)
            assert torch.equal(guard.forward(**inputs).logits, want_logits)
        with hg.wrap(model, methods=[Probe(stats_only)]) as guard:  # a single forward may be right-padded
            assert torch.equal(guard.forward(**inputs).logits, want_logits)
            with pytest.raises(ValueError, match="input_ids"):
                model.generate(inputs_embeds=embeds, max_new_tokens=3)


def test_eager_prefix_lm_without_token_types_keeps_its_mask():
    model = build_model("paligemma", attn_implementation="eager")
    inputs, _ = make_inputs(model, "paligemma")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        want = model(**inputs).logits
        with hg.wrap(model, methods=[]) as guard:
            assert torch.equal(guard.forward(**inputs).logits, want)
        with hg.wrap(model, methods=[Probe(reference_everywhere)]) as guard:
            got = guard.forward(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_output_attentions_are_returned_from_the_reference_path():
    model = build_model("llava", attn_implementation="eager")
    inputs, _ = make_inputs(model, "llava")
    with torch.no_grad():
        want = model(**inputs, output_attentions=True).attentions
        with hg.wrap(model, methods=[Probe(reference_everywhere)]) as guard:
            got = guard.forward(**inputs, output_attentions=True).attentions
    real = inputs["attention_mask"].bool()
    for w, g in zip(want, got):
        torch.testing.assert_close(g.permute(0, 2, 1, 3)[real], w.permute(0, 2, 1, 3)[real], atol=1e-5, rtol=1e-5)
