"""Lookback Lens detection.

* the per-token lookback ratios from the hook equal a brute-force computation from eager attention
  with ``output_attentions`` (means over the context and the generated keys), with left padding;
* detection leaves the generated tokens identical to plain ``generate``;
* a classifier scores windows of tokens and flags runs; it survives a save/load round trip, and a
  classifier for another layer/head count (or context), or with a weight that is not finite, is
  refused; one trained for another model of the same layout is named in a warning; pickles are
  never read;
* guided decoding with one candidate is ``generate``'s sampling exactly; with several it keeps, per
  prompt and chunk, the candidate the classifier rates most faithful (the first when all are the
  same), and the output is the kept chunks;
* beam search is refused, and guided decoding without a classifier or with greedy search.
"""

import dataclasses
import json

import pytest
import torch
from tiny_models import CORE_FAMILIES, FAMILIES, build_model, family_params, image_token_id, make_inputs

import halluguard as hg
from halluguard.methods.lookback.classifier import LookbackClassifier, train_classifier
from halluguard.methods.lookback.method import flagged_spans, window_means

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)


def brute_force_ratios(model, inputs, context_group="prompt", gen=GEN):
    """(rows, T, L, H) lookback ratios from eager attention maps of a plain greedy generate."""
    with torch.no_grad():
        out = model.generate(**inputs, **gen, output_attentions=True, return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    valid = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == image_token_id(model)
    context = {"prompt": valid, "image": valid & image, "text": valid & ~image}[context_group]
    steps = []
    for step, layers in enumerate(out.attentions):
        per_layer = []
        for attn in layers:  # (B, H, q, kv)
            row = attn[:, :, -1].float()  # the query producing this step's token
            kv = row.shape[-1]
            ctx = torch.nn.functional.pad(context, (0, kv - prompt))[:, None]
            gen = torch.zeros(kv, dtype=torch.bool)
            gen[prompt:] = True
            a_ctx = (row * ctx).sum(-1) / ctx.sum(-1)
            a_new = (row * gen).sum(-1) / gen.sum() if step else torch.zeros_like(a_ctx)
            per_layer.append(a_ctx / (a_ctx + a_new))
        steps.append(torch.stack(per_layer, 1))  # (B, L, H)
    return torch.stack(steps, 1), out.sequences


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("context", ["prompt", "image", "text"])
def test_ratios_equal_output_attentions(family, context):
    model = build_model(family)
    eager = build_model(family, attn_implementation="eager")
    inputs, _ = make_inputs(model, family, batch=2)
    want, sequences = brute_force_ratios(eager, inputs, context)
    with hg.wrap(model, methods=hg.get_config("lookback", context=context)) as guard, torch.no_grad():
        out = model.generate(**inputs, **GEN)
    assert torch.equal(out, sequences)
    got = torch.stack([d.features for d in guard.results["lookback"]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ratios_stay_exact_past_twice_the_prompt():
    """The key groups of a full cache are kept for twice the keys seen: a generation longer than the
    prompt outgrows them, and they are made again."""
    model = build_model("llava")
    eager = build_model("llava", attn_implementation="eager")
    inputs, _ = make_inputs(model, "llava", batch=2)
    tokens = inputs["input_ids"].shape[1] + 3
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    want, sequences = brute_force_ratios(eager, inputs, "prompt", gen)
    with hg.wrap(model, methods=hg.get_config("lookback")) as guard, torch.no_grad():
        out = model.generate(**inputs, **gen)
    assert torch.equal(out, sequences)
    got = torch.stack([d.features for d in guard.results["lookback"]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_layers_that_count_other_generated_keys_divide_by_their_own_count():
    """A sliding-window layer sees fewer generated keys than a full one: each layer's generated mass
    is its own keys' mean; 0 / 0 gives 0.5."""
    import types

    from halluguard.methods.lookback.method import Lookback, LookbackCall

    method = Lookback(hg.get_config("lookback"))
    method.num_layers = 2
    data = LookbackCall()
    state = types.SimpleNamespace(data_of=lambda m: data)
    ctx = torch.tensor([[0.2, 0.0]])
    gen = [torch.tensor([[0.6, 0.0]]), torch.tensor([[0.3, 0.0]])]
    for layer, count in enumerate((6, 3)):
        data.generated = count
        stats = {"mass/context": ctx, "mass/generated": gen[layer]}
        method.on_stats(state, types.SimpleNamespace(layer_idx=layer), stats)
    ratios = data.steps[-1]  # (rows, L, H)
    want = torch.tensor([[[0.2 / (0.2 + 0.6 / 6), 0.5], [0.2 / (0.2 + 0.3 / 3), 0.5]]])
    torch.testing.assert_close(ratios, want)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_detection_leaves_tokens_identical(family, tmp_path):
    model = build_model(family)
    inputs, _ = make_inputs(model, family, batch=2)
    layers, heads = model.config.get_text_config().num_hidden_layers, model.config.get_text_config().num_attention_heads
    path = tmp_path / "clf.json"
    LookbackClassifier(torch.randn(layers * heads), 0.1, layers, heads).save(path)
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        plain = model.generate(**inputs, **gen)
        with hg.wrap(model, methods=hg.get_config("lookback", classifier=str(path))) as guard:
            guarded = model.generate(**inputs, **gen)
    assert torch.equal(plain, guarded)
    detections = guard.results["lookback"]
    assert len(detections) == 2
    for d in detections:
        assert d.features.shape == (12, layers, heads)
        assert d.hallucination.shape == (12,) and bool(((d.hallucination >= 0) & (d.hallucination <= 1)).all())
        assert d.spans == flagged_spans((d.hallucination > 0.5).tolist())


def test_windows_and_spans():
    x = torch.arange(10.0)[:, None]
    means = window_means(x, 3)[:, 0]
    assert means.tolist() == [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert window_means(x, 20)[:, 0].tolist() == [sum(range(i + 1)) / (i + 1) for i in range(10)]
    assert flagged_spans([False, True, True, False, True]) == [(1, 3), (4, 5)]
    assert flagged_spans([]) == []


def test_classifier_trains_saves_loads_and_refuses_other_models(tmp_path):
    torch.manual_seed(0)
    layers, heads = 3, 4
    features = torch.rand(200, layers * heads)
    labels = (features[:, 5] > 0.5).long()  # faithful exactly when one head looks back
    clf = train_classifier(features, labels, layers, heads, model="tiny")
    p = clf.faithful_probability(features)
    assert float(((p > 0.5).long() == labels).float().mean()) > 0.9
    path = tmp_path / "clf.json"
    clf.save(path)
    loaded = LookbackClassifier.load(path)
    torch.testing.assert_close(loaded.faithful_probability(features), p)
    assert json.loads(path.read_text())["label"].startswith("1 = faithful")
    with pytest.raises(ValueError, match="3 layers x 4 heads"):
        loaded.check(4, 4)
    with pytest.raises(ValueError, match="context"):
        loaded.check(3, 4, "image")
    model = build_model("llava")  # 3 layers x 4 heads, so a 2 x 4 classifier does not fit it
    LookbackClassifier(torch.zeros(8), 0.0, 2, 4).save(tmp_path / "small.json")
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        hg.wrap(model, methods=hg.get_config("lookback", classifier=str(tmp_path / "small.json")))
    (tmp_path / "official.pkl").write_bytes(b"\x80\x04K\x01.")  # a pickle: never unpickled
    with pytest.raises(ValueError, match="not a halluguard lookback classifier|cannot read"):
        LookbackClassifier.load(tmp_path / "official.pkl")


def test_refusals():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    with pytest.raises(ValueError, match="needs a classifier"):
        hg.wrap(model, methods=hg.get_config("lookback", mode="guide"))
    with hg.wrap(model, methods="lookback"), pytest.raises(ValueError, match="cannot follow beam search"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2)


def _classifier(model, path, weights=None, bias=0.0):
    text = model.config.get_text_config()
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    w = weights if weights is not None else torch.randn(layers * heads, generator=torch.Generator().manual_seed(1))
    LookbackClassifier(w, bias, layers, heads).save(path)
    return str(path)


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_guided_with_one_candidate_is_sampling(family, tmp_path):
    model = build_model(family)
    inputs, _ = make_inputs(model, family, batch=2)
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, top_k=0)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = model.generate(**inputs, **gen)
        cfg = hg.get_config(
            "lookback", mode="guide", num_candidates=1, chunk_size=4, classifier=_classifier(model, tmp_path / "c.json")
        )
        with hg.wrap(model, methods=cfg) as guard:
            torch.manual_seed(3)
            guided = model.generate(**inputs, **gen)
    assert torch.equal(plain, guided)
    assert [d.features.shape[0] for d in guard.results["lookback"]] == [10, 10]


def test_guided_decoding_samples_as_the_official_code_and_runs_to_256_tokens_unless_told(tmp_path):
    """The official generate calls the guided decoding with no sampling warper (temperature 1, no
    top-p) and its own 256-token length; a call's own settings win."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    cfg = hg.get_config(
        "lookback", mode="guide", num_candidates=1, chunk_size=4, classifier=_classifier(model, tmp_path / "c.json")
    )
    official = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, **official)
        with hg.wrap(model, methods=cfg):
            torch.manual_seed(3)
            guided = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8)
            unbounded = model.generate(**inputs, min_new_tokens=256)  # no limit set: 256
            told = model.generate(**inputs, max_new_tokens=5, temperature=0.9, top_p=0.95, do_sample=True)
    assert torch.equal(guided, plain)  # one candidate: sampling itself, at temperature 1 and top-p 1
    prompt = inputs["input_ids"].shape[1]
    assert unbounded.shape[1] == prompt + 256 and told.shape[1] == prompt + 5


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_guided_keeps_the_candidate_the_classifier_prefers(family, tmp_path):
    from halluguard.methods.lookback.method import Lookback

    model = build_model(family)
    inputs, _ = make_inputs(model, family, batch=2)
    chunks = []
    cfg = hg.get_config(
        "lookback", mode="guide", num_candidates=4, chunk_size=3, classifier=_classifier(model, tmp_path / "c.json")
    )
    method = Lookback(cfg, on_chunk=chunks.append)
    with torch.no_grad(), hg.wrap(model, methods=[method]) as guard:
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=9, min_new_tokens=9)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 9 and len(chunks) == 3
    kept = []
    for chunk in chunks:
        distinct = ~(chunk["tokens"] == chunk["tokens"][:, :1]).all(-1).all(-1)
        want = torch.where(distinct, chunk["faithful"].argmax(-1), 0)
        assert torch.equal(chunk["kept"], want)
        kept.append(chunk["tokens"][torch.arange(2), chunk["kept"]])
    assert torch.equal(out[:, -9:], torch.cat(kept, -1))
    assert [d.features.shape[0] for d in guard.results["lookback"]] == [9, 9]


def test_a_classifier_that_prefers_a_known_continuation_makes_guided_decoding_pick_it(tmp_path):
    from halluguard.methods.lookback.method import Lookback

    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    text = model.config.get_text_config()
    layers, heads = text.num_hidden_layers, text.num_attention_heads

    def run(weights):
        chunks = []
        path = tmp_path / "c.json"
        LookbackClassifier(weights, 0.0, layers, heads).save(path)
        cfg = hg.get_config("lookback", mode="guide", num_candidates=2, chunk_size=4, classifier=str(path))
        with torch.no_grad(), hg.wrap(model, methods=[Lookback(cfg, on_chunk=chunks.append)]):
            torch.manual_seed(5)
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
        return out, chunks[0]

    _, first = run(torch.zeros(layers * heads))  # all scores equal: candidate 0 is kept
    assert int(first["kept"][0]) == 0
    candidates, features = first["tokens"][0], first["features"][0]
    assert not torch.equal(candidates[0], candidates[1])
    # the same draws again, with a classifier that prefers the candidate not kept: w . (x1 - x0) > 0
    out, second = run(features[1] - features[0])
    assert torch.equal(second["tokens"][0], candidates) and int(second["kept"][0]) == 1
    assert torch.equal(out[0, -4:], candidates[1])


def test_guided_refusals(tmp_path):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    cfg = hg.get_config("lookback", mode="guide", classifier=_classifier(model, tmp_path / "c.json"))
    with hg.wrap(model, methods=cfg), pytest.raises(ValueError, match="greedy search"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="cannot compose"):
        hg.wrap(model, methods=[cfg, hg.get_config("vhr")])


def test_a_classifier_with_non_finite_weights_is_refused(tmp_path):
    path = tmp_path / "nan.json"
    LookbackClassifier(torch.ones(12), 0.0, 3, 4).save(path)
    record = json.loads(path.read_text())
    record["weights"][5] = float("nan")
    path.write_text(json.dumps(record))
    model = build_model("llava")
    with pytest.raises(ValueError, match="holds 1 weight\\(s\\) that are not finite numbers"):
        hg.wrap(model, methods=hg.get_config("lookback", classifier=str(path)))
    assert not hasattr(model, "_halluguard_guard")


def test_a_classifier_trained_for_another_model_of_the_same_layout_is_named_in_a_warning(tmp_path):
    import warnings

    from halluguard import testbed

    model, _ = testbed.load()
    shipped = LookbackClassifier.load(testbed.path() / "lookback.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the test model's own classifier: no warning
        hg.wrap(model, methods=hg.get_config("lookback", classifier=str(testbed.path() / "lookback.json"))).unwrap()
    other = tmp_path / "other.json"
    dataclasses.replace(shipped, model="llava-hf/llava-1.5-7b-hf").save(other)
    with pytest.warns(UserWarning, match="trained for 'llava-hf/llava-1.5-7b-hf', and this model is '.*testbed"):
        hg.wrap(model, methods=hg.get_config("lookback", classifier=str(other))).unwrap()
