"""OPERA: its beam search with look-ahead and rollback.

* penalty weight 0 with retrospection off is transformers' beam search (same sequences and scores),
  batch 2 with left padding, on every core family;
* the look-ahead rows (the chosen layer's head-max row of every candidate, forwarded side by side
  under a tree mask, from the hook) equal a brute-force computation from eager attention with
  ``output_attentions`` on each candidate's own sequence;
* the column score in log space equals the official product formula;
* attention forced onto one response token triggers a rollback to the token after it, and the
  (beam, token) choices rejected there are never chosen again; the rollback limit per position moves
  the target back one position, as the official code does;
* the history kept for rollbacks stays bounded over 512 new tokens;
* VHR and VAR act inside OPERA's forwards (at their neutral settings OPERA's tokens do not change);
* sampling, greedy search, contrastive methods and static caches are refused with clear errors.
"""

import math

import pytest
import torch
from tiny_models import CORE_FAMILIES, build_model, make_inputs
from transformers import LogitsProcessor, LogitsProcessorList

import halluguard as hg
from halluguard.attention.edits import AttentionEdit
from halluguard.methods.base import Method
from halluguard.methods.opera.method import OPERA
from halluguard.methods.opera.scores import column_log_products, over_trust

NEUTRAL = dict(penalty_weights=0.0, retrospection=False, length_normalisation="transformers")


def opera(events=None, **settings):
    return OPERA(hg.get_config("opera", **settings), on_step=events.append if events is not None else None)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_neutral_opera_is_transformers_beam_search(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family, batch=2)
    gen = dict(max_new_tokens=10, num_beams=3, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        plain = model.generate(**inputs, **gen)
        with hg.wrap(model, methods=[opera(**NEUTRAL)]):
            guarded = model.generate(**inputs, **gen)
    assert torch.equal(plain.sequences, guarded.sequences)
    torch.testing.assert_close(guarded.sequences_scores, plain.sequences_scores, rtol=0, atol=1e-5)
    assert len(plain.scores) == len(guarded.scores)
    for ours, theirs in zip(guarded.scores, plain.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert torch.equal(plain.beam_indices, guarded.beam_indices)


class Scripted(LogitsProcessor):
    """Test helper: replaces the scores with a fixed function of each row's tokens (random per row,
    the end tokens likelier the longer the row), so hypotheses end at many different steps and the
    beam-search rules (finished slots, length penalty, early stopping) all come into play."""

    def __init__(self, ends: list[int], prompt_len: int, boost: float):
        self.ends, self.prompt_len, self.boost = ends, prompt_len, boost

    def __call__(self, input_ids, scores):
        out = torch.empty_like(scores)
        for i, row in enumerate(input_ids.tolist()):
            generator = torch.Generator().manual_seed(hash(tuple(row[-4:])) % 2**31 + len(row))
            logits = 2 * torch.randn(scores.shape[-1], generator=generator)
            logits[self.ends] += self.boost * (len(row) - self.prompt_len)
            out[i] = logits.log_softmax(-1)
        return out


ENDS = [3, 7]


def scripted_beam_search(inputs: dict, **settings) -> dict:
    """``generate`` arguments of a beam search on ``Scripted`` scores: two end tokens, 4 beams, 12 new
    tokens, the 2 best sequences returned with their scores (``settings`` add or replace)."""
    scripted = Scripted(ENDS, inputs["input_ids"].shape[1], boost=0.8)
    return dict(
        max_new_tokens=12, num_beams=4, num_return_sequences=2, eos_token_id=ENDS, return_dict_in_generate=True,
        output_scores=True, logits_processor=LogitsProcessorList([scripted]), **settings,
    )  # fmt: skip


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 2.0, 0.5, 0.0, -1.0])
def test_neutral_opera_is_beam_search_in_every_setting(length_penalty, early_stopping):
    """The search's own bookkeeping (halluguard.methods.opera.beams) against generate's, on scripted scores:
    two end tokens, several returned sequences, each length penalty and early-stopping rule."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=2)
    gen = scripted_beam_search(inputs, length_penalty=length_penalty, early_stopping=early_stopping, output_logits=True)
    with torch.no_grad():
        plain = model.generate(**inputs, **gen)
        with hg.wrap(model, methods=[opera(**NEUTRAL)]):
            guarded = model.generate(**inputs, **gen)
    assert torch.equal(plain.sequences, guarded.sequences)
    assert torch.equal(plain.beam_indices, guarded.beam_indices)
    torch.testing.assert_close(guarded.sequences_scores, plain.sequences_scores, rtol=0, atol=1e-5)
    assert len(guarded.scores) == len(plain.scores) and len(guarded.logits) == len(plain.logits)
    for ours, theirs in [*zip(guarded.scores, plain.scores), *zip(guarded.logits, plain.logits)]:
        live = ~torch.isneginf(ours).all(-1)  # a sample whose search ended gets -inf rows (generate computes on)
        torch.testing.assert_close(ours[live], theirs[live], rtol=0, atol=1e-5)
    assert not bool(torch.isneginf(guarded.scores[0]).all(-1).any())


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_official_ranking_divides_by_the_prompt_as_opera_counts_it_plus_the_generated_tokens(length_penalty):
    """transformers 4.29, which the official search runs: a finished hypothesis scores its summed
    log-probabilities over (text prompt + one placeholder per image + generated tokens without the
    end token) ** length_penalty."""
    model = build_model("llava")
    inputs, spans = make_inputs(model, "llava", batch=2)
    prompt = inputs["input_ids"].shape[1]
    gen = scripted_beam_search(inputs, length_penalty=length_penalty)
    with torch.no_grad():
        with hg.wrap(model, methods=[opera(penalty_weights=0.0, retrospection=False)]):
            official = model.generate(**inputs, **gen)
        with hg.wrap(model, methods=[opera(**NEUTRAL)]):
            current = model.generate(**inputs, **gen)
    summed = model.compute_transition_scores(official.sequences, official.scores, official.beam_indices).sum(-1)
    for row in range(4):
        sample = row // 2
        ((start, end),) = spans[sample]
        counted = int(inputs["attention_mask"][sample].sum()) - (end - start) + 1
        answer = official.sequences[row, prompt:].tolist()
        generated = next((k for k, t in enumerate(answer) if t in ENDS), len(answer))  # without the end token
        expected = summed[row] / (counted + generated) ** length_penalty
        torch.testing.assert_close(official.sequences_scores[row], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(official.sequences_scores, current.sequences_scores)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lookahead_rows_equal_output_attentions(family):
    model = build_model(family)
    eager = build_model(family, attn_implementation="eager")
    inputs, _ = make_inputs(model, family, batch=1)
    events = []
    with torch.no_grad(), hg.wrap(model, methods=[opera(events, image_bonus_tokens=2)]):
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=2)
    prompt = inputs["input_ids"].shape[1]
    checked = 0
    for event in events:
        if "candidates" not in event:
            continue
        beams, candidates = event["candidates"].shape
        for row in range(beams * candidates):
            ids = torch.cat([event["sequences"][row // candidates], event["candidates"].reshape(-1)[row : row + 1]])
            full = dict(inputs, input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
            if "mm_token_type_ids" in full:
                extra = ids.shape[0] - inputs["mm_token_type_ids"].shape[1]
                full["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, extra))
            with torch.no_grad():
                attn = eager(**full, output_attentions=True).attentions[-1][0, :, -1]  # (H, T)
            head_max = attn.amax(0)
            # the candidates sit side by side after the beam's tokens; each sees only its own slot
            beam, n = divmod(row, candidates)
            ours, start, end = event["rows"][beam, n], event["from_key"], ids.shape[0] - 1
            torch.testing.assert_close(ours[: end - start], head_max[start:end], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours[end - start + n], head_max[end], rtol=1e-4, atol=1e-5)
            assert float(ours[end - start :].sum()) == pytest.approx(float(head_max[end]), rel=1e-4)
            torch.testing.assert_close(event["sums"][beam, n], head_max.sum(), rtol=1e-4, atol=1e-5)
            checked += 1
        assert event["from_key"] == (0 if event["step"] < 2 else prompt)  # full rows only for the image bonus
    assert checked == 4 * 2 * 5


def test_column_score_equals_the_official_product():
    torch.manual_seed(0)
    steps, rows, sigma = 7, 3, 50.0
    w = torch.rand(rows, steps, steps).tril() / steps  # lower-triangular weights, rows i over columns j
    w[0, 4, 2] = 0.0  # a zero weight: that column's product is 0
    history = torch.zeros(rows, 0)
    for i in range(steps - 1):
        history = column_log_products(history, w[:, i, : i + 1], sigma)
    columns = column_log_products(history, w[:, -1], sigma)
    phi, loc = over_trust(columns)
    official = torch.stack([1e-7 * (sigma * w[:, j:, j]).prod(-1) for j in range(steps)], -1)
    torch.testing.assert_close(phi, official.max(-1).values, rtol=1e-5, atol=0)
    assert torch.equal(loc, official.argmax(-1))
    # far past float16 (the official buffer) and float32: finite, and the largest column still wins
    big = column_log_products(torch.full((1, 3), 400.0), torch.full((1, 4), 0.5), sigma)
    assert math.isfinite(float(over_trust(big)[0]))


class FocusOn(Method):
    """Test helper: from response position ``position`` on, every query of the layer OPERA reads
    attends almost only to that token (a key bias), the over-trust pattern OPERA looks for."""

    def __init__(self, position: int, opera: OPERA):
        super().__init__()
        self.position, self.opera = position, opera

    def attention_edit(self, state, call):
        slot = state.prompt_len + self.position
        if call.layer_idx != self.opera.layer or call.is_prefill or call.kv_len <= slot:
            return None
        bias = torch.zeros(call.batch, call.kv_len)
        bias[:, slot] = 30.0
        return AttentionEdit(key_bias=bias)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_forced_summary_token_triggers_rollback_and_rejected_tokens_stay_rejected(family):
    model = build_model(family, text_overrides={"sliding_window": 16} if family == "gemma3" else None)
    if family == "gemma3":  # the response outgrows the window: a rollback crops sliding layers too
        with hg.wrap(model) as guard:
            assert guard.adapter.sliding_layers() == {0, 2}
    inputs, _ = make_inputs(model, family, batch=1)
    events = []
    method = opera(events)
    with torch.no_grad(), hg.wrap(model, methods=[FocusOn(10, method), method]):
        model.generate(**inputs, max_new_tokens=60, min_new_tokens=60, num_beams=3)
    rollbacks = [e["rollback"] for e in events if "rollback" in e]
    # the summary location is 10 from step 11 on (at step 10 the token there is still a candidate, and
    # the other candidates, side by side with it, do not see it): more than r = 15 times at step 26
    first = next(e for e in events if "rollback" in e)
    assert first["step"] == 26 and first["rollback"] == 11
    # position 11 takes N = 5 rollbacks, then the target moves back to the summary token itself
    assert rollbacks[:6] == [11] * 5 + [10]
    # the history keeps the re-decided step 11's entry (location 10) and grows from step 12 on, so
    # position 10 is the summary more than 15 times again at step 26 (dropping that entry: step 27)
    steps = [e["step"] for e in events if "rollback" in e]
    assert steps[1] == 26
    redecoded = [e for e in events if "rejected" in e]
    assert len(redecoded) == len(rollbacks)
    for event in redecoded:
        parents, tokens = event["chosen"]
        for old_parents, old_tokens in event["rejected"]:
            for p, t in zip(parents.tolist(), tokens.tolist()):
                assert (p, t) not in set(zip(old_parents.tolist(), old_tokens.tolist()))


def test_rollback_history_stays_bounded():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    events = []
    with torch.no_grad(), hg.wrap(model, methods=[opera(events, window_size=16, num_attn_candidates=2)]):
        out = model.generate(**inputs, max_new_tokens=512, min_new_tokens=512, num_beams=2)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 512
    assert max(e["kept"] for e in events if "kept" in e) <= 17


@pytest.mark.parametrize("other", ["vhr", "var"])
def test_attention_methods_act_inside_opera(other):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=2)
    gen = dict(max_new_tokens=8, min_new_tokens=8, num_beams=2)
    var = dict(sink_dims=(5, 9), tau=1.8, rho=0.9, summ=0.2, first_layer=0, skip_last_layer=False)
    settings = {"vhr": dict(alpha=1.0), "var": dict(var, p=1.0)}[other]
    active = {"vhr": dict(alpha=3.0), "var": dict(var, p=0.3)}[other]
    runs = {}
    with torch.no_grad():
        for name, cfg in (("alone", None), ("neutral", settings), ("active", active)):
            events = []
            methods = [opera(events)] + ([hg.get_config(other, **cfg)] if cfg is not None else [])
            with hg.wrap(model, methods=methods):
                runs[name] = (model.generate(**inputs, **gen), events)
    assert torch.equal(runs["alone"][0], runs["neutral"][0])
    rows = lambda run: [e["rows"] for e in run[1] if "rows" in e]
    for alone, neutral in zip(rows(runs["alone"]), rows(runs["neutral"]), strict=True):
        torch.testing.assert_close(alone, neutral)
    first_active = rows(runs["active"])[0]  # the same prompt and first candidates as alone, other attention
    assert not torch.allclose(rows(runs["alone"])[0], first_active)


def test_refusals():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    with hg.wrap(model, methods="opera"):
        with pytest.raises(ValueError, match="sampling"):
            model.generate(**inputs, max_new_tokens=2, do_sample=True)
        with pytest.raises(ValueError, match="num_beams=1"):
            model.generate(**inputs, max_new_tokens=2, num_beams=1)
        with pytest.raises(ValueError, match="dynamic cache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="contrast branch"):
        hg.wrap(model, methods="opera+vcd")
    with pytest.raises(ValueError, match="defined and tested inside it are"):
        hg.wrap(model, methods=["opera", hg.PAIConfig(use_cfg=False)])
    assert model.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2


def test_default_beams_come_from_the_config_and_the_call_wins():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    seen = []
    for call, expected in (({}, 4), ({"num_beams": 2}, 2)):
        events = []
        with torch.no_grad(), hg.wrap(model, methods=[opera(events, num_beams=4)]):
            model.generate(**inputs, max_new_tokens=2, **call)
        seen.append(events[0]["candidates"].shape[0])
        assert seen[-1] == expected


def test_the_layer_read_sees_the_whole_response():
    model = build_model("gemma3")  # layers: sliding, full, sliding
    method = OPERA(hg.get_config("opera"))
    with hg.wrap(model, methods=[method]):
        assert method.layer == 1
    with pytest.raises(ValueError, match="sliding window"):
        hg.wrap(model, methods=hg.get_config("opera", layer=-1))
    with pytest.raises(ValueError, match="outside"):
        hg.wrap(model, methods=hg.get_config("opera", layer=3))


def test_the_methods_declared_to_run_inside_opera_compose_with_it():
    from halluguard import registry

    for name in hg.list_methods(available_only=True):
        method = registry.entry(name).method_cls(hg.get_config(name))
        if method.owns_loop:
            inside = [
                n
                for n in hg.list_methods(available_only=True)
                if name in registry.entry(n).capabilities_for().runs_inside
            ]
            assert inside, f"{name} owns the loop: no method declares it runs inside it"


@pytest.mark.parametrize("record", ["output_scores", "output_logits"])
def test_per_step_outputs_follow_rollbacks(record):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    events = []
    method = opera(events)
    with torch.no_grad(), hg.wrap(model, methods=[FocusOn(10, method), method]):
        out = model.generate(
            **inputs, max_new_tokens=40, min_new_tokens=40, num_beams=3, return_dict_in_generate=True, **{record: True}
        )
    assert any("rollback" in e for e in events)
    steps = out.scores if record == "output_scores" else out.logits
    assert len(steps) == out.sequences.shape[1] - inputs["input_ids"].shape[1] == 40
