"""One matrix for every method that runs, on every supported family (PEFT's common-tester style).

A method joins by being registered: the matrix takes ``list_methods(available_only=True)``. For
each method x family:

* its neutral config generates plain ``generate``'s tokens, greedy and beam search;
* after a guarded generate with the method acting, ``unwrap`` restores the logits bit for bit;
* a left-padded batch generates what its rows generate alone (method acting);
* greedy, sampling and beam search all run (method acting), or are refused with a clear error
  (``BEAM_ONLY``: a method that is a beam search refuses greedy search and sampling; ``NO_BEAMS``: a
  method whose per-row readings cannot follow beam search refuses it).

``ACTIVE`` gives the settings at which a method acts on the tiny random models, and ``CONTEXT``
what every config of a method needs there besides its strength (the tiny models have no massive
activations, so VAR needs sink dimensions named, and a low threshold finds sinks; DeCoRe needs
retrieval heads). The batch and
decoding-mode checks, and every check on the families outside ``CORE_FAMILIES``, are marked ``slow``
(``python -m pytest -m slow``, run in CI).
"""

import pytest
import torch
from probes import assert_batch_rows_equal_single_rows, assert_guard_keeps_tokens
from tiny_models import FAMILIES, build_model, family_params, make_inputs

import halluguard as hg
from halluguard import registry

METHODS = hg.list_methods(available_only=True)
RETRIEVAL_HEADS = {"0-0": [0.9, 1.0], "1-1": [0.8], "0-2": [0.5], "1-3": [0.1]}  # the official file format
ACTIVE = {
    "vhr": dict(alpha=3.0),
    "var": dict(sink_dims=(5, 9), tau=1.8, rho=0.9, p=0.3, first_layer=1),
    "pai": dict(alpha=1.0, start_layer=0, gamma=2.0),
    "vcd": dict(alpha=1.0),
    "avc": dict(alpha=1.0),
    "decore": dict(retrieval_heads=RETRIEVAL_HEADS, num_retrieval_heads=3),
    "opera": dict(scale_factor=50.0),
    "lookback": dict(context="prompt"),
}
# methods that are a beam search: greedy and sampling are refused with a clear error
BEAM_ONLY = {"opera"}
# methods whose per-row readings cannot follow beam search: beam search is refused with a clear error
NO_BEAMS = {"lookback"}
CONTEXT = {
    "var": dict(sink_dims=(5, 9), tau=1.8, first_layer=1),
    "decore": dict(retrieval_heads=RETRIEVAL_HEADS, num_retrieval_heads=3),
}
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
CASES = [case for m in METHODS for case in family_params(FAMILIES, m)]


def active(name):
    return hg.get_config(name, **ACTIVE.get(name, {}))


def neutral(name):
    return registry.entry(name).config_cls.neutral().replace(**CONTEXT.get(name, {}))


def test_every_method_that_runs_has_active_settings_here():
    assert set(METHODS) <= set(ACTIVE), f"add matrix settings for {sorted(set(METHODS) - set(ACTIVE))}"


@pytest.mark.parametrize("name,family", CASES)
def test_neutral_config_is_plain_generate(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    if name in NO_BEAMS:
        with torch.no_grad():
            want = model.generate(**inputs, **GEN)
            with hg.wrap(model, methods=neutral(name)):
                assert torch.equal(model.generate(**inputs, **GEN), want)
                with pytest.raises(ValueError, match="cannot follow beam search"):
                    model.generate(**inputs, **GEN, num_beams=3)
        return
    if name not in BEAM_ONLY:
        assert_guard_keeps_tokens(model, inputs, neutral(name), GEN)
        return
    with torch.no_grad():
        want = model.generate(**inputs, **GEN, num_beams=3)
        with hg.wrap(model, methods=neutral(name)):
            assert torch.equal(model.generate(**inputs, **GEN, num_beams=3), want)


@pytest.mark.parametrize("name,family", CASES)
def test_unwrap_restores_logits_bit_for_bit(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    with torch.no_grad():
        before = model(**inputs).logits
        with hg.wrap(model, methods=active(name)) as guard:
            guarded = guard.generate(**inputs, **GEN)
        after = model(**inputs).logits
    assert guarded.shape[1] == inputs["input_ids"].shape[1] + GEN["max_new_tokens"]
    assert torch.equal(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("name,family", CASES)
def test_a_left_padded_batch_equals_its_rows_alone(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    with hg.wrap(model, methods=active(name)):
        assert_batch_rows_equal_single_rows(model, inputs, family, dict(GEN, num_beams=2) if name in BEAM_ONLY else GEN)


@pytest.mark.slow
@pytest.mark.parametrize("name,family", CASES)
def test_greedy_sampling_and_beam_search_run(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    width = inputs["input_ids"].shape[1] + GEN["max_new_tokens"]
    with hg.wrap(model, methods=active(name)), torch.no_grad():
        if name in NO_BEAMS:
            with pytest.raises(ValueError, match="cannot follow beam search"):
                model.generate(**inputs, **GEN, num_beams=2)
            beam = model.generate(**inputs, **GEN)  # greedy in its place
        else:
            beam = model.generate(**inputs, **GEN, num_beams=2)
        if name in BEAM_ONLY:
            with pytest.raises(ValueError, match="num_beams=1"):
                model.generate(**inputs, **GEN, num_beams=1)
            with pytest.raises(ValueError, match="sampling"):
                model.generate(**inputs, max_new_tokens=4, do_sample=True)
            assert beam.shape == (inputs["input_ids"].shape[0], width)
            return
        greedy = model.generate(**inputs, **GEN)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True)
    for out in (greedy, beam, sampled):
        assert out.shape == (inputs["input_ids"].shape[0], width)


STATIC_FAMILIES = ["llava", "qwen2_vl", "gemma3", "paligemma"]


@pytest.mark.parametrize("name,family", [(m, f) for m in METHODS for f in STATIC_FAMILIES])
def test_neutral_config_with_a_static_cache_is_plain_generate(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family, batch=1)  # unpadded: the prompt's forward gets no mask at all
    static = dict(GEN, cache_implementation="static")
    with torch.no_grad():
        want = model.generate(**inputs, **static)
        with hg.wrap(model, methods=neutral(name)):
            if name in BEAM_ONLY:  # it crops and reorders a dynamic cache
                with pytest.raises(ValueError, match="dynamic cache"):
                    model.generate(**inputs, **static, num_beams=2)
                return
            assert torch.equal(model.generate(**inputs, **static), want)
