"""One matrix for every method that runs, on every supported family (PEFT's common-tester style).

A method joins by being registered: the matrix takes ``list_methods(available_only=True)``. For
each method x family:

* its neutral config generates plain ``generate``'s tokens, greedy and beam search;
* its active config acts, against plain ``generate`` with the same inputs and decoding (greedy
  search where the method takes it, else beam search): a method with a strength (an active config
  other than its neutral one) changes the tokens or, where a tiny model keeps them, the next-token
  scores (``output_scores``, compared as log-probabilities over the tokens both keep); a method that
  reports readings (``Method.call_result``) has read them (``READINGS``: Lookback Lens' ratios
  have every row's shape, lie in [0, 1], are 1 at the first token and below 1 somewhere after), and
  one that only reads leaves tokens and scores unchanged. The mirror: each method switched off (its
  neutral point, every other field kept) fails that check, and the readings check fails without
  readings;
* after a guarded generate with the method acting, ``unwrap`` restores the logits bit for bit;
* a left-padded batch generates what its rows generate alone (method acting);
* greedy, sampling and beam search all run (method acting), or are refused with the reason the
  method itself gives (``Method.decoding_refusal``: OPERA, a beam search, refuses greedy search and
  sampling; Lookback Lens, whose per-row readings cannot follow beam search, refuses beams). What a
  method can decode is always asked of the method, never restated here.

Every composition of two methods that ``registry.check_composition`` accepts (asked of the methods
built from their active configs) runs on every family, with a decoding both parts take:

* both parts act: switching either off changes the output (a part with a strength), and a part that
  reads has read the composed model (its readings pass its check and follow the tokens it read);
* the identity: one part switched off + the other generates what the other generates alone (tokens
  exactly, scores up to float rounding, the same readings);
* each branch stream a part runs (a contrast's: VCD, AvisC, DeCoRe; PAI's image-free guidance) is
  there, and the other part acts in it exactly when it is an attention-level method and the branch is
  a contrast: its branch logits change against the same method acting in the main stream only.

``ACTIVE`` gives the settings at which a method acts on the tiny random models, and ``CONTEXT``
what every config of a method needs there besides its strength (the tiny models have no massive
activations, so VAR needs sink dimensions named, and a low threshold finds sinks; DeCoRe needs
retrieval heads). Every generate the act and composition checks compare runs once per test session
(``generate``). The batch and decoding-mode checks, and every check on the families outside
``CORE_FAMILIES``, are marked ``slow`` (``python -m pytest -m slow``, run in CI).
"""

import dataclasses
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from probes import assert_batch_rows_equal_single_rows
from tiny_models import CORE_FAMILIES, FAMILIES, build_model, family_params, make_inputs
from transformers import LogitsProcessor, LogitsProcessorList

import halluguard as hg
from halluguard import registry
from halluguard.methods.base import Method

METHODS = hg.list_methods(available_only=True)


def tiny_vti_directions() -> str:
    """VTI text directions of the tiny models' decoders (every family's: 3 layers of width 64), saved
    once per session under the temporary folder (the encoders differ, so the matrix steers text only;
    ``test_method_vti`` checks the vision part)."""
    from safetensors.torch import save_file

    path = Path(tempfile.gettempdir()) / f"halluguard-matrix-vti-{os.getpid()}.safetensors"
    if not path.exists():
        save_file({"text": torch.randn(3, 64, generator=torch.Generator().manual_seed(0))}, str(path))
    return str(path)


VTI_DIRECTIONS = tiny_vti_directions()
RETRIEVAL_HEADS = {"0-0": [0.9, 1.0], "1-1": [0.8], "0-2": [0.5], "1-3": [0.1]}  # the official file format
ACTIVE = {
    # two layers (one's heads are chosen with the other reinforced), not layer 1: reinforced there, it makes
    # every LLaVA image token a sink of layer 2, and VAR has no image token left to give mass to in vhr+var
    "vhr": dict(alpha=3.0, layers=(0, 2)),
    "var": dict(sink_dims=(5, 9), tau=1.8, rho=0.9, p=0.3, first_layer=1),
    "pai": dict(alpha=1.0, start_layer=0, gamma=2.0),
    "vcd": dict(alpha=1.0),
    "avc": dict(alpha=1.0),
    "decore": dict(retrieval_heads=RETRIEVAL_HEADS, num_retrieval_heads=3),
    "opera": dict(scale_factor=50.0),
    "lookback": dict(context="prompt"),
    "m3id": dict(lamda=0.6, confidence=1.0),
    "icd": dict(alpha=1.0, prefix_ids=(40, 41, 42, 43, 44, 45)),
    "vista": dict(lamda=0.8, logits_alpha=0.5),
    "memvr": dict(retracing_ratio=0.9, entropy_threshold=0.0),
    "vti": dict(directions=VTI_DIRECTIONS, alpha_text=3.0, alpha_image=0.0),
    "only": dict(alpha_pos=3.0, alpha_neg=3.0, gamma=0.0),
}
CONTEXT = {
    "vti": dict(directions=VTI_DIRECTIONS, alpha_image=0.0),
    "icd": dict(prefix_ids=(40, 41, 42, 43, 44, 45)),  # the tiny models come without a processor
    "var": dict(sink_dims=(5, 9), tau=1.8, first_layer=1),
    "decore": dict(retrieval_heads=RETRIEVAL_HEADS, num_retrieval_heads=3),
}
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
# (num_beams, do_sample) of each decoding the matrix runs
DECODINGS = {"greedy search": (1, False), "sampling": (1, True), "beam search": (2, False)}
# (method, family) pairs the method refuses at wrap, with the reason (checked by a test below)
REFUSED = {("only", "gemma3"): "ONLY's read-out is written for LLaMA's layer layout; Gemma 3 has norms around its MLP"}


def families_for(*names):
    """The families every one of ``names`` runs on."""
    return tuple(f for f in FAMILIES if not any((n, f) in REFUSED for n in names))


CASES = [case for m in METHODS for case in family_params(families_for(m), m)]


def active(name):
    return hg.get_config(name, **ACTIVE.get(name, {}))


def neutral(name):
    return registry.entry(name).config_cls.neutral().replace(**CONTEXT.get(name, {}))


def method_of(config):
    """The ``Method`` a guard builds for ``config`` (a ``Method`` already: itself); what a method can do
    is asked of it."""
    return config if isinstance(config, Method) else registry.entry(config.name).method_cls(config)


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


def acts_on_logits_only(config):
    """Whether a method leaves every forward's internals alone (its change is to next-token logits):
    not an attention-level method (``acts_in_branches``) nor one that steers feed-forward outputs."""
    method = method_of(config)
    return not (method.capabilities.acts_in_branches or method.edits_mlp_outputs)


@pytest.mark.parametrize("name,family", list(REFUSED))
def test_a_family_left_out_is_refused_by_the_method_itself(name, family):
    with pytest.raises(ValueError, match=name):
        hg.wrap(build_model(family), methods=active(name))


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


@pytest.mark.parametrize("name,family", [(m, f) for m in METHODS for f in STATIC_FAMILIES if f in families_for(m)])
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


@pytest.mark.parametrize(
    "name,family", [(m, f) for m in METHODS for f in ("llava", "qwen2_vl") if f in families_for(m)]
)
def test_an_acting_method_gives_the_same_tokens_with_a_static_cache(name, family):
    """The streams a method opens (a probe run apart, a branch as its own forwards) and its layer hooks
    give the same greedy tokens when ``generate`` keeps a static cache, or the method refuses it."""
    model, inputs = model_and_inputs(family)
    config = active(name)
    beams = beams_for(config)
    kwargs = dict(GEN, num_beams=beams)
    with torch.no_grad(), hg.wrap(model, methods=config):
        want = model.generate(**inputs, **kwargs)
        method = method_of(config)
        if method.owns_loop or (beams > 1 and method.edits_next_logits):  # refused: a dynamic cache is needed
            with pytest.raises(ValueError, match="cache"):
                model.generate(**inputs, **kwargs, cache_implementation="static")
            return
        assert torch.equal(model.generate(**inputs, **kwargs, cache_implementation="static"), want)


# ---- every method acts ----------------------------------------------------------------------------
# A method with a strength (its active config is not its neutral one) changes the generation: its
# tokens, or where a tiny random model keeps them, its next-token scores. A method that reports
# readings (``Method.call_result``) has read them; one that only reads leaves tokens and scores alone.

ACTS_TOL = 1e-3  # a change of a next-token log-probability below this is float rounding, not a method acting
SAME_SCORES = dict(rtol=0, atol=1e-4)  # a neutral method's kernel path rounds differently (VAR keeping every sink)


@dataclasses.dataclass
class Run:
    """One ``generate(output_scores=True)``: its tokens and scores, what the guard's methods read
    (``guard.results``) and each branch stream's next-token logits ``(steps, rows, vocab)``, by owner."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...]
    results: dict[str, Any]
    branches: dict[str, torch.Tensor]


class BranchLogits(LogitsProcessor):
    """Keeps, at every step, the next-token logits of each branch of the guard's call."""

    def __init__(self, guard):
        self.guard, self.seen = guard, {}

    def __call__(self, input_ids, scores):
        session = self.guard.session
        for method in session.branches:
            self.seen.setdefault(method.name, []).append(session.main.branch_logits(method, input_ids).clone())
        return scores


_MODELS: dict[str, tuple[torch.nn.Module, dict]] = {}
_RUNS: dict[tuple, Run] = {}


def model_and_inputs(family):
    """The family's tiny model and its padded batch, built once per test session."""
    if family not in _MODELS:
        model = build_model(family)
        _MODELS[family] = model, make_inputs(model, family)[0]
    return _MODELS[family]


def generate(family, configs, beams):
    """The ``Run`` of a guarded generate with ``configs`` (none: plain ``generate``), computed once."""
    key = (family, tuple(repr(c) for c in configs), beams)
    if key not in _RUNS:
        model, inputs = model_and_inputs(family)
        kwargs = dict(GEN, num_beams=beams, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            if not configs:
                out, results, branches = model.generate(**inputs, **kwargs), {}, {}
            else:
                with hg.wrap(model, methods=list(configs)) as guard:
                    seen = BranchLogits(guard)
                    out = model.generate(**inputs, **kwargs, logits_processor=LogitsProcessorList([seen]))
                    results, branches = dict(guard.results), {k: torch.stack(v) for k, v in seen.seen.items()}
        _RUNS[key] = Run(out.sequences, out.scores, results, branches)
    return _RUNS[key]


def output_change(a, b):
    """How far ``b``'s output is from ``a``'s: infinite where the tokens differ, else the largest change
    of a next-token log-probability, each step's scores renormalised over the tokens both keep finite
    (a log-space contrast shifts a row's scores alike; OPERA keeps only its candidates)."""
    if not torch.equal(a.sequences, b.sequences):
        return math.inf
    change = 0.0
    for x, y in zip(a.scores, b.scores, strict=True):
        kept = x.isfinite() & y.isfinite()
        x, y = x.masked_fill(~kept, -math.inf), y.masked_fill(~kept, -math.inf)
        change = max(change, float((x.log_softmax(-1) - y.log_softmax(-1))[kept].abs().max()))
    return change


def assert_same_output(got, want, what):
    """Identical tokens, next-token scores equal up to float rounding, the same readings."""
    assert torch.equal(got.sequences, want.sequences), f"{what}: other tokens"
    for step, (x, y) in enumerate(zip(got.scores, want.scores, strict=True)):
        torch.testing.assert_close(x, y, **SAME_SCORES, msg=lambda m, step=step: f"{what}: step {step}: {m}")
    for name in want.results:
        torch.testing.assert_close(READINGS[name].values(got), READINGS[name].values(want), **SAME_SCORES)


def switched_off(config):
    """``config`` at its method's neutral point (its strength off, every other field kept)."""
    return config.replace(**type(config).neutral_overrides)


def has_strength(name):
    """Whether the method's active setting is not its neutral one: it has something to switch off."""
    return active(name) != switched_off(active(name))


def reports_readings(name):
    """Whether the method reports what it read (it overrides ``Method.call_result``)."""
    return type(method_of(active(name))).call_result is not Method.call_result


class LookbackReadings:
    """Lookback Lens' readings: per row, every generated token's lookback ratios ``(T, layers, heads)``."""

    @staticmethod
    def values(run):
        return torch.stack([detection.features for detection in run.results["lookback"]])

    @staticmethod
    def check(run, family):
        model, inputs = model_and_inputs(family)
        text = model.config.get_text_config()
        assert "lookback" in run.results, "Lookback Lens reported no readings"
        ratios = LookbackReadings.values(run)
        rows, new = inputs["input_ids"].shape[0], GEN["max_new_tokens"]
        assert ratios.shape == (rows, new, text.num_hidden_layers, text.num_attention_heads)
        assert bool(((ratios >= 0) & (ratios <= 1)).all()), "a lookback ratio outside [0, 1]"
        # the first token's query has no generated key to look at: all its attention is on the context
        assert torch.equal(ratios[:, 0], torch.ones_like(ratios[:, 0])), "first token's ratios are not 1"
        # later queries attend to generated tokens too: some head of every row looks back less than fully
        assert bool((ratios[:, 1:] < 1).flatten(1).any(1).all()), "no head of a row ever attends a generated token"


# what each method that reports readings must have read
READINGS = {"lookback": LookbackReadings}


def test_every_method_that_acts_has_an_observable_here():
    for name in METHODS:
        assert has_strength(name) or reports_readings(name), f"{name}: neither a strength nor readings to observe"
        assert not reports_readings(name) or name in READINGS, f"add a readings check for {name}"


def assert_acts(family, config):
    """``config`` acts on ``family`` as its method does (see the section comment above)."""
    name, beams = config.name, beams_for(config)
    plain, guarded = generate(family, (), beams), generate(family, (config,), beams)
    change = output_change(plain, guarded)
    if has_strength(name):
        assert change > ACTS_TOL, f"{name} does not act on {family}: its output is plain generate's ({change:.2g})"
    else:
        assert_same_output(guarded, plain, f"{name}, which only reads, on {family}")
    if reports_readings(name):
        READINGS[name].check(guarded, family)


@pytest.mark.parametrize("name,family", CASES)
def test_active_config_acts(name, family):
    assert_acts(family, active(name))


@pytest.mark.parametrize(
    "name,family", [(n, f) for n in METHODS if has_strength(n) for f in CORE_FAMILIES if f in families_for(n)]
)
def test_the_acts_check_fails_for_a_method_switched_off(name, family):
    """The mirror of ``test_active_config_acts``: the same method at its neutral point fails it."""
    with pytest.raises(AssertionError, match="does not act"):
        assert_acts(family, switched_off(active(name)))


@pytest.mark.parametrize("name", [n for n in METHODS if reports_readings(n)])
def test_the_readings_check_fails_without_readings(name):
    """The readings check fails on a plain generate (nothing read) and on readings stuck at one value."""
    plain = generate("llava", (), 1)
    with pytest.raises(AssertionError):
        READINGS[name].check(plain, "llava")
    guarded = generate("llava", (active(name),), beams_for(active(name)))
    stuck = dataclasses.replace(guarded, results={})
    stuck.results[name] = [dataclasses.replace(r, features=torch.ones_like(r.features)) for r in guarded.results[name]]
    with pytest.raises(AssertionError):
        READINGS[name].check(stuck, "llava")


# ---- every composition the registry accepts --------------------------------------------------------


def composes(a, b):
    """Whether ``registry.check_composition`` accepts methods ``a`` and ``b`` (at their active settings)."""
    try:
        registry.check_composition([method_of(active(a)), method_of(active(b))])
    except ValueError:
        return False
    return True


PAIRS = [(a, b) for i, a in enumerate(METHODS) for b in METHODS[i + 1 :] if composes(a, b)]
PAIR_CASES = [case for a, b in PAIRS for case in family_params(families_for(a, b), a, b)]


def with_part_off(configs, i):
    """``configs`` with part ``i`` switched off (at its neutral point), the order kept."""
    return tuple(switched_off(c) if j == i else c for j, c in enumerate(configs))


def test_the_registry_accepts_some_compositions_and_refuses_others():
    assert PAIRS, "no two methods compose"
    assert len(PAIRS) < len(METHODS) * (len(METHODS) - 1) // 2, "every pair composes: the refusals went missing"


@pytest.mark.parametrize("a,b,family", PAIR_CASES)
def test_a_composition_runs_and_both_parts_act(a, b, family):
    """``a+b`` runs with a decoding both take, and each part acts in it: switching one part off changes
    the output (a part with a strength), and a part that reads has read the composed model: its
    readings pass its check, move where the tokens it read differ from those it reads alone, and stay
    its own where they do not and the other part acts on next-token logits only (not an attention-level
    method: those may move them, as VHR does, or keep each token's share of the context, as VAR does)."""
    both = (active(a), active(b))
    beams = beams_for(*both)
    run = generate(family, both, beams)
    _, inputs = model_and_inputs(family)
    assert run.sequences.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + GEN["max_new_tokens"])
    for i, part in enumerate(both):
        other = both[1 - i]
        if has_strength(part.name):
            change = output_change(generate(family, with_part_off(both, i), beams), run)
            assert change > ACTS_TOL, f"{part.name} does not act in {a}+{b} on {family} ({change:.2g})"
        if reports_readings(part.name):
            READINGS[part.name].check(run, family)
            alone = generate(family, (part,), beams)
            moved = float((READINGS[part.name].values(run) - READINGS[part.name].values(alone)).abs().max())
            # a token's reading comes from the forward fed the tokens before it
            if not torch.equal(run.sequences[:, :-1], alone.sequences[:, :-1]):
                assert moved > SAME_SCORES["atol"], f"{part.name}'s readings in {a}+{b} on {family} ignore the tokens"
            elif acts_on_logits_only(other):
                assert moved <= SAME_SCORES["atol"], f"{part.name}'s readings in {a}+{b} on {family} moved: {moved:.2g}"


@pytest.mark.parametrize("a,b,family", PAIR_CASES)
def test_a_composition_with_one_part_switched_off_is_the_other_part_alone(a, b, family):
    """The identity behind the check above: ``a`` at its neutral point + ``b`` generates what ``b``
    alone generates (tokens exactly, scores up to float rounding, the same readings), and vice versa."""
    both = (active(a), active(b))
    beams = beams_for(*both)
    for i, part in enumerate(both):
        other = both[1 - i]
        got, want = generate(family, with_part_off(both, i), beams), generate(family, (other,), beams)
        assert_same_output(got, want, f"{part.name} switched off + {other.name} on {family}")


def main_stream_only(config):
    """The method of ``config`` acting in the main stream only, not in other methods' branches: beside
    the method itself, it shows what the method does in a branch (the main stream being the same)."""
    method_cls = registry.entry(config.name).method_cls
    capabilities = dataclasses.replace(registry.entry(config.name).capabilities_for(config), acts_in_branches=False)
    variant = type(f"{method_cls.__name__}InTheMainStreamOnly", (method_cls,), {"capabilities": capabilities})
    return variant(config)


# AvisC's setting in the branch check: with the default threshold few image tokens are blind (kept in its
# branch), the rest zeroed, and on most tiny models none of them is a sink for VAR, whose rule then leaves
# the branch alone; at lamb 0 about half are kept
BRANCH_CHECK = {"avc": dict(lamb=0.0)}
# (part, owner, family) where the part sits in the owner's branch and by its own rule changes nothing there
QUIET_IN_BRANCH = {
    ("var", "avc", "qwen2_5_vl"): "no image token of AvisC's blind view is among VAR's sinks",
    # M3ID's branch is the prompt without its image: no image key to amplify or to give mass to
    **{
        (part, "m3id", family): "the image-free branch has no image key"
        for part in ("pai", "var")
        for family in FAMILIES
    },
}


# owners whose branch prompt is built from what the main stream's prompt forward computed: a part that
# steers the main stream (VISTA) changes their branch through it, without acting in the branch
SHAPED_BY_THE_MAIN_STREAM = {"avc": "AvisC's blind tokens are chosen from the main stream's attention"}


def branch_setting(name):
    return active(name).replace(**BRANCH_CHECK.get(name, {}))


def scores_from_another_stream(name):
    """Whether the method's next-token scores use a stream of its own (a contrast's or a guidance branch)."""
    method = method_of(active(name))
    asks_streams = type(method).streams is not Method.streams  # (ONLY contrasts within the main forward)
    return asks_streams and (method.edits_next_logits or type(method).logits_processors is not Method.logits_processors)


BRANCH_CASES = [
    case
    for a, b in PAIRS
    if scores_from_another_stream(a) or scores_from_another_stream(b)
    for case in family_params(families_for(a, b), a, b)
]


def branch_change(a, b, owner):
    """The largest change of ``owner``'s branch logits from run ``a`` to run ``b``."""
    return float((a.branches[owner] - b.branches[owner]).abs().max())


@pytest.mark.parametrize("a,b,family", BRANCH_CASES)
def test_an_attention_level_part_acts_in_the_other_parts_contrast_branch(a, b, family):
    """``a+b`` runs the branches its parts run alone; the other part acts in a branch exactly when it is
    an attention-level method (``acts_in_branches``: VHR with the heads chosen in the main stream, VAR,
    PAI's amplification) and the branch is a contrast (its owner edits the next-token logits: VCD, AvisC,
    DeCoRe), so that both sides of the contrast differ only in what the contrast is about. Seen in the
    branch's own logits: an attention-level part changes them against the same part acting in the main
    stream only (``main_stream_only``: the main stream, hence every token up to the first change, is the
    same), and leaves them in PAI's image-free stream (the plain model's); any other part leaves the
    branch's first-step logits (the prompt's) as they are with that part switched off or left out.
    ``QUIET_IN_BRANCH`` names the cases where an attention-level part, by its own rule, changes nothing."""
    both = (branch_setting(a), branch_setting(b))
    beams = beams_for(*both)
    run = generate(family, both, beams)
    assert run.branches, f"{a}+{b} runs no branch"
    assert set(run.branches) == {owner for c in both for owner in generate(family, (c,), beams).branches}
    for owner in run.branches:
        j = 0 if owner == b else 1  # the other part
        other, owner_config = both[j], both[1 - j]
        if method_of(other).capabilities.acts_in_branches:
            main_only = tuple(main_stream_only(c) if k == j else c for k, c in enumerate(both))
            change = branch_change(run, generate(family, main_only, beams), owner)
            if method_of(owner_config).edits_next_logits and (other.name, owner, family) not in QUIET_IN_BRANCH:
                assert change > SAME_SCORES["atol"], f"{other.name} does not act in {owner}'s branch on {family}"
                continue
        elif not acts_on_logits_only(other) and owner in SHAPED_BY_THE_MAIN_STREAM:
            continue  # the part steers the main stream only, from which the owner builds its branch
        else:
            off = with_part_off(both, j) if has_strength(other.name) else (owner_config,)
            without = generate(family, off, beams)
            change = float((run.branches[owner][0] - without.branches[owner][0]).abs().max())
        assert change <= SAME_SCORES["atol"], f"{other.name} acts in {owner}'s branch on {family}: {change:.2g}"
