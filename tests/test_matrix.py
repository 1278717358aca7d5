"""One matrix for every method that runs, on every supported family (PEFT's common-tester style).

A method joins by being registered: the matrix takes ``list_methods(available_only=True)``. For
each method x family:

* its neutral config generates plain ``generate``'s tokens, greedy and beam search;
* after a guarded generate with the method acting, ``unwrap`` restores the logits bit for bit;
* a left-padded batch generates what its rows generate alone (method acting);
* greedy, sampling and beam search all run (method acting), or are refused with the reason the
  method itself gives (``Method.decoding_refusal``: OPERA, a beam search, refuses greedy search and
  sampling; Lookback Lens, whose per-row readings cannot follow beam search, refuses beams). What a
  method can decode is always asked of the method, never restated here.

``ACTIVE`` gives the settings at which a method acts on the tiny random models, and ``CONTEXT``
what every config of a method needs there besides its strength (the tiny models have no massive
activations, so VAR needs sink dimensions named, and a low threshold finds sinks; DeCoRe needs
retrieval heads). The batch and
decoding-mode checks, and every check on the families outside ``CORE_FAMILIES``, are marked ``slow``
(``python -m pytest -m slow``, run in CI).
"""

import re

import pytest
import torch
from probes import assert_batch_rows_equal_single_rows
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
CONTEXT = {
    "var": dict(sink_dims=(5, 9), tau=1.8, first_layer=1),
    "decore": dict(retrieval_heads=RETRIEVAL_HEADS, num_retrieval_heads=3),
}
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
# (num_beams, do_sample) of each decoding the matrix runs
DECODINGS = {"greedy search": (1, False), "sampling": (1, True), "beam search": (2, False)}
CASES = [case for m in METHODS for case in family_params(FAMILIES, m)]


def active(name):
    return hg.get_config(name, **ACTIVE.get(name, {}))


def neutral(name):
    return registry.entry(name).config_cls.neutral().replace(**CONTEXT.get(name, {}))


def method_of(config):
    """The ``Method`` a guard builds for ``config``: what a method can do is asked of it."""
    return registry.entry(config.name).method_cls(config)


def refusal(configs, num_beams, do_sample=False):
    """What a guarded ``generate`` says when a method of ``configs`` cannot decode with ``num_beams``
    beams and ``do_sample`` (None: every method can)."""
    for config in configs:
        reason = method_of(config).decoding_refusal(num_beams, do_sample)
        if reason is not None:
            return f"{config.name}: {reason}"
    return None


def beams_for(*configs):
    """The beams the matrix decodes ``configs`` with: greedy search if every method takes it, else
    beam search."""
    beams = next((n for n in (1, 3) if refusal(configs, n) is None), None)
    assert beams is not None, f"{'+'.join(c.name for c in configs)} runs neither greedy nor beam search"
    return beams


def test_every_method_that_runs_has_active_settings_here():
    assert set(METHODS) <= set(ACTIVE), f"add matrix settings for {sorted(set(METHODS) - set(ACTIVE))}"


@pytest.mark.parametrize("name,family", CASES)
def test_neutral_config_is_plain_generate(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    config, ran = neutral(name), []
    with torch.no_grad():
        for beams in (1, 3):
            want = model.generate(**inputs, **GEN, num_beams=beams)
            with hg.wrap(model, methods=config):
                reason = refusal([config], beams)
                if reason is not None:
                    with pytest.raises(ValueError, match=re.escape(reason)):
                        model.generate(**inputs, **GEN, num_beams=beams)
                    continue
                assert torch.equal(model.generate(**inputs, **GEN, num_beams=beams), want), f"{beams} beam(s)"
                ran.append(beams)
    assert ran, f"{name} refuses both greedy and beam search"


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
        beams = beams_for(active(name))
        assert_batch_rows_equal_single_rows(model, inputs, family, dict(GEN, num_beams=min(beams, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("name,family", CASES)
def test_greedy_sampling_and_beam_search_run(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    width = inputs["input_ids"].shape[1] + GEN["max_new_tokens"]
    config, ran = active(name), []
    with hg.wrap(model, methods=config), torch.no_grad():
        for decoding, (beams, sample) in DECODINGS.items():
            kwargs = dict(GEN, num_beams=beams, do_sample=sample)
            reason = refusal([config], beams, sample)
            if reason is not None:
                with pytest.raises(ValueError, match=re.escape(reason)):
                    model.generate(**inputs, **kwargs)
                continue
            torch.manual_seed(0)
            assert model.generate(**inputs, **kwargs).shape == (inputs["input_ids"].shape[0], width), decoding
            ran.append(decoding)
    assert ran, f"{name} refuses every decoding"


STATIC_FAMILIES = ["llava", "qwen2_vl", "gemma3", "paligemma"]


@pytest.mark.parametrize("name,family", [(m, f) for m in METHODS for f in STATIC_FAMILIES])
def test_neutral_config_with_a_static_cache_is_plain_generate(name, family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family, batch=1)  # unpadded: the prompt's forward gets no mask at all
    config = neutral(name)
    static = dict(GEN, cache_implementation="static", num_beams=min(beams_for(config), 2))
    with torch.no_grad():
        want = model.generate(**inputs, **static)
        with hg.wrap(model, methods=config):
            if method_of(config).owns_loop:  # a decoding loop crops and reorders a dynamic cache (decoding.loops)
                with pytest.raises(ValueError, match="dynamic cache"):
                    model.generate(**inputs, **static)
                return
            assert torch.equal(model.generate(**inputs, **static), want)
