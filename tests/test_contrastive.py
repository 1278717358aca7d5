"""Contrastive decoding: VCD, AvisC (``avc``) and DeCoRe.

* the branch riding along as extra rows gives the logits two separate forwards give (and the same
  tokens), on every core family, greedy and with beam search (where the branch run apart follows
  the beams' reordering by their tokens);
* a static cache (the branch run apart) gives the rows' tokens; beam search there is refused;
* AvisC's blind tokens equal a brute-force computation from eager attention with
  ``output_attentions``, and its branch's input embeddings are the main ones with exactly the
  non-blind image tokens replaced;
* DeCoRe with no heads masked, and composed with an attention method, adds nothing to that method;
  its uniform masking makes a head output the mean of the values it may see;
* VCD's noise follows the official schedule and does not depend on the batch.
"""

import json

import pytest
import torch
from tiny_models import CORE_FAMILIES, build_model, make_inputs

import halluguard as hg
from halluguard import registry
from halluguard.attention.derived import Derived
from halluguard.attention.edits import AttentionEdit
from halluguard.attention.hook import _edited
from halluguard.decoding import contrast
from halluguard.methods.avc.method import select_layers
from halluguard.methods.vcd.method import add_diffusion_noise, noise_level

HEADS = {"0-0": [0.9, 1.0], "1-1": [0.8], "0-2": [0.5], "1-3": [0.1]}
SETTINGS = {"vcd": {}, "avc": {}, "decore": dict(retrieval_heads=HEADS, num_retrieval_heads=3)}
# every method with a control row's settings here (M3ID's and ICD's branches have tests of their own)
CONTROLLED = {
    **SETTINGS,
    "m3id": dict(lamda=0.6, confidence=1.0),
    "icd": dict(prefix_ids=(40, 41, 42)),
    "only": dict(alpha_pos=3.0, alpha_neg=3.0),
}
GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def recording(name, **settings):
    """The method, keeping every step's (main logits, branch logits) it contrasts."""
    base = registry.entry(name).method_cls

    class Recording(base):
        def combine(self, state, logits, other):
            self.seen.append((logits.clone(), other.clone()))
            return super().combine(state, logits, other)

    method = Recording(hg.get_config(name, **{**SETTINGS[name], **settings}))
    method.seen = []
    return method


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_branch_rows_give_what_two_separate_forwards_give(name, family, beams):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    settings = {} if name == "decore" else dict(beta=0.0)  # no cutoff: the beams' tokens differ
    runs = {}
    with torch.no_grad():
        for separate in (False, True):
            method = recording(name, separate_stream=separate, **settings)
            with hg.wrap(model, methods=[method]):
                out = model.generate(**inputs, **GEN, num_beams=beams)
            runs[separate] = (out, method.seen)
    (rows_out, rows_seen), (apart_out, apart_seen) = runs[False], runs[True]
    assert torch.equal(rows_out, apart_out)
    if beams > 1:  # the beams of a sample differ, so a branch row following the wrong beam would show
        best = rows_seen[1][0].argmax(-1).view(-1, beams)
        assert bool((best != best[:, :1]).any()), "the beams did not diverge: the check would not discriminate"
    assert len(rows_seen) == len(apart_seen) == GEN["max_new_tokens"]
    for (main_a, branch_a), (main_b, branch_b) in zip(rows_seen, apart_seen):
        torch.testing.assert_close(main_a, main_b, rtol=0, atol=1e-5)
        torch.testing.assert_close(branch_a, branch_b, rtol=0, atol=1e-5)
        assert not torch.allclose(main_a, branch_a, atol=1e-3)  # the branch sees something else


@pytest.mark.parametrize("name", list(SETTINGS))
def test_alpha_zero_is_plain_generate_with_no_branch(name):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    settings = dict(alpha_mode="static") if name == "decore" else {}
    method = recording(name, alpha=0.0, **settings)
    with torch.no_grad():
        want = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=[method]):
            assert torch.equal(model.generate(**inputs, **GEN), want)
    assert method.seen == []


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_static_cache_runs_the_branch_apart_with_the_same_tokens(name):
    model = build_model("qwen2_vl")
    inputs, _ = make_inputs(model, "qwen2_vl", batch=1)
    with torch.no_grad(), hg.wrap(model, methods=[recording(name)]):
        rows = model.generate(**inputs, **GEN)
        apart = model.generate(**inputs, **GEN, cache_implementation="static")
        with pytest.raises(ValueError, match="beam search needs generate's default cache"):
            model.generate(**inputs, **GEN, num_beams=2, cache_implementation="static")
    assert torch.equal(rows, apart)


def test_two_contrastive_methods_do_not_compose_and_guarded_forward_refuses_them():
    model = build_model("llava")
    with pytest.raises(ValueError, match="cannot compose 'vcd' and 'avc'"):
        hg.wrap(model, methods="vcd+avc")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods="vcd") as guard, pytest.raises(ValueError, match="vcd act"):
        guard.forward(**inputs)


# ---- AvisC --------------------------------------------------------------------------------------
def brute_force_blind(model, inputs, image_id, gamma, lamb):
    """The official selection, row by row, from eager attention maps (``output_attentions``)."""
    eager = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(eager)
    blind = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b in range(inputs["input_ids"].shape[0]):
        img = (inputs["input_ids"][b] == image_id).nonzero().flatten()
        per_layer = [m[b].mean(0)[-1, img] for m in maps]  # head mean, last query row, image keys
        portion = torch.stack([r.sum() for r in per_layer])
        portion = portion / portion.sum()
        ranked = sorted(range(len(per_layer)), key=lambda i: -float(portion[i]))
        k, total = 0, 0.0
        for i in ranked:  # count the layers whose cumulative share stays below gamma, plus one
            total += float(portion[i])
            if total < gamma:
                k += 1
        g = torch.stack([per_layer[i] for i in ranked[: k + 1]]).mean(0)
        blind[b, img] = g >= g.mean() + lamb * g.std()
    return blind


@pytest.mark.parametrize("gamma,lamb", [(0.5, 1.0), (0.9, 0.5), (0.2, 0.0)])
def test_blind_tokens_equal_a_brute_force_computation_and_the_branch_sees_only_them(gamma, lamb):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    image_id = model.config.image_token_id
    want = brute_force_blind(model, inputs, image_id, gamma, lamb)

    base = registry.entry("avc").method_cls
    kept = {}

    class Keeping(base):
        def new_call_state(self):
            kept["data"] = super().new_call_state()
            return kept["data"]

    embeds = []
    method = Keeping(hg.get_config("avc", layer_gamma=gamma, lamb=lamb))
    with torch.no_grad(), hg.wrap(model, methods=[method]):  # the guard's edit runs before this hook
        handle = model.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"].clone()), with_kwargs=True
        )
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        handle.remove()
    got = kept["data"].blind
    assert torch.equal(got, want)
    assert bool(want.any()) and bool((~want & (inputs["input_ids"] == image_id)).any())
    # forward 1: the main prompt; forward 2: the branch's prefill, at its own (compact) width
    main, branch = embeds[0], embeds[1]
    width = branch.shape[1]
    valid = inputs["attention_mask"].bool()[:, -width:]
    replaced = ((inputs["input_ids"] == image_id) & ~want)[:, -width:]
    zeroed = (branch == 0).all(-1)
    assert torch.equal(zeroed & valid, replaced)
    kept_rows = valid & ~replaced
    assert torch.equal(branch[kept_rows], main[:, -width:][kept_rows])


def test_layer_selection_takes_the_top_share_plus_one():
    masses = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert select_layers(masses, 0.5).tolist() == [1, 3]  # 0.4 < 0.5, then 0.7: two layers
    assert select_layers(masses, 0.4).tolist() == [1]  # 0.4 is not below 0.4: one layer
    assert select_layers(masses, 1.0).tolist() == [1, 3, 2, 0]


# ---- DeCoRe -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_decore_with_no_head_masked_is_plain_generate(family, tmp_path):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    path = tmp_path / "heads.json"
    path.write_text(json.dumps(HEADS))
    method = recording("decore", retrieval_heads=str(path), num_retrieval_heads=0)
    with torch.no_grad():
        want = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=[method]):
            assert torch.equal(model.generate(**inputs, **GEN), want)
    assert len(method.seen) == GEN["max_new_tokens"]  # the branch ran: the plain model's logits


@pytest.mark.parametrize(
    "other",
    [
        hg.get_config("vhr", alpha=3.0),
        hg.get_config("var", sink_dims=(5, 9), tau=1.8, rho=0.9, p=0.3, first_layer=1),
        hg.get_config("pai", alpha=1.0, start_layer=0, use_cfg=False),
    ],
    ids=lambda c: c.name,
)
def test_attention_methods_act_in_the_branch_as_in_the_main_rows(other):
    """DeCoRe masking nothing contrasts two identical models: the attention method's own tokens."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    decore = recording("decore", num_retrieval_heads=0)
    with torch.no_grad():
        with hg.wrap(model, methods=[other]):
            want = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=[other, decore]):
            got = model.generate(**inputs, **GEN)
    assert torch.equal(got, want)
    for main, branch in decore.seen:
        torch.testing.assert_close(main, branch, rtol=0, atol=1e-3)  # float rounding of two batch layouts


def test_uniform_masking_makes_a_head_output_the_mean_of_its_visible_values():
    model = build_model("llava")
    attn = model.get_decoder().layers[0].self_attn
    heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 5, dim, generator=gen) for n in (heads, kv_heads, kv_heads))
    scale = torch.ones(2, heads)
    scale[0, 1] = 0.0
    scale[1, heads - 1] = 0.0
    out, _, _ = _edited(
        attn,
        q,
        k,
        v,
        None,
        [AttentionEdit(query_scale=scale)],
        "sdpa",
        dict(dropout=0.0, scaling=None, is_causal=None),
        Derived(),
    )
    group = heads // kv_heads
    for b, h in ((0, 1), (1, heads - 1)):
        values = v[b, h // group]
        means = torch.stack([values[: i + 1].mean(0) for i in range(5)])  # causal: keys up to the row
        torch.testing.assert_close(out[b, :, h], means, rtol=0, atol=1e-5)
    plain, _, _ = _edited(
        attn, q, k, v, None, [AttentionEdit()], "sdpa", dict(dropout=0.0, scaling=None, is_causal=None), Derived()
    )
    untouched = scale.bool()
    assert torch.equal(out.transpose(1, 2)[untouched], plain.transpose(1, 2)[untouched])


# ---- VCD ----------------------------------------------------------------------------------------
def test_vcd_noise_follows_the_official_schedule_and_each_image_gets_its_own_draw():
    assert noise_level(500) == pytest.approx(0.7448, abs=1e-4)
    assert noise_level(0) == pytest.approx(1 - 1e-5 - (0.5e-2 - 1e-5) * torch.sigmoid(torch.tensor(-6.0)).item())
    pixels = torch.randn(3, 3, 8, 8)
    both = add_diffusion_noise(pixels, 500, [slice(0, 1), slice(1, 3)], seed=7)
    alone = add_diffusion_noise(pixels[1:3], 500, [slice(0, 2)], seed=7)
    assert torch.equal(both[1:3], alone)
    eps = (both - 0.7448**0.5 * pixels) / (1 - 0.7448) ** 0.5
    assert abs(float(eps.std()) - 1.0) < 0.15


def test_vcd_noise_is_independent_across_images_and_the_same_for_an_image_in_any_batch():
    first, second = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    abar = noise_level(500)
    eps = lambda noised, clean: (noised - abar**0.5 * clean) / (1 - abar) ** 0.5
    pair = add_diffusion_noise(torch.cat([first, second]), 500, [slice(0, 1), slice(1, 2)], seed=7)
    swapped = add_diffusion_noise(torch.cat([second, first]), 500, [slice(0, 1), slice(1, 2)], seed=7)
    alone = add_diffusion_noise(second, 500, [slice(0, 1)], seed=7)
    assert torch.equal(pair[1:], alone) and torch.equal(swapped[:1], alone) and torch.equal(swapped[1:], pair[:1])
    # two images, two draws: the noise is not one tensor shared by the whole dataset
    assert (
        float(torch.corrcoef(torch.stack([eps(pair[0], first[0]).flatten(), eps(pair[1], second[0]).flatten()]))[0, 1])
        < 0.3
    )
    assert not torch.equal(add_diffusion_noise(first, 500, [slice(0, 1)], seed=8), pair[:1])
    # padding after an image's values (AnyRes tiles, Idefics images of a row) leaves its noise as it was
    tiles = torch.stack([first, second], dim=1)  # (images, tiles, C, H, W)
    padded = torch.cat([tiles, torch.zeros_like(tiles)], dim=1)
    noised = add_diffusion_noise(tiles, 500, [slice(0, 1)], seed=7)
    assert torch.equal(add_diffusion_noise(padded, 500, [slice(0, 1)], seed=7)[:, :2], noised)


@pytest.mark.parametrize("name", list(CONTROLLED))
def test_the_control_row_is_the_cutoff_alone_with_no_branch(name):
    """``control=True``: the logits under the plausibility cutoff (DeCoRe, which has none: the base
    log-probabilities), and no branch rows at all; greedy tokens are plain decoding's, since the cutoff
    always keeps the top token."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    rows = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, k: rows.append(
            k["input_ids"].shape[0] if k.get("input_ids") is not None else k["inputs_embeds"].shape[0]
        ),
        with_kwargs=True,
    )
    greedy = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**inputs, **greedy)
        rows.clear()
        cutoff = {} if name == "decore" else dict(beta=0.9)  # tight enough to cut some of these logits
        with hg.wrap(model, methods=hg.get_config(name, **CONTROLLED[name], **cutoff, control=True)):
            control = model.generate(**inputs, **greedy)
    hook.remove()
    assert set(rows) == {inputs["input_ids"].shape[0]}  # the main rows only: no branch ran
    assert torch.equal(control.sequences, plain.sequences)
    beta = 0.0 if name == "decore" else 0.9
    space = "log_probs" if name == "decore" else "logits"
    for got, logits in zip(control.logits, plain.logits):
        expected = contrast(logits, logits, 1.0, 0.0, space=space, beta=beta)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)], rtol=1e-5, atol=1e-5)
    assert any(bool(torch.isinf(g).any()) for g in control.logits) or name == "decore"


def test_vcd_per_step_copy_contrasts_the_first_token_then_only_cuts_as_the_release_did():
    """The release before the July 2024 fix copied the clean branch's cache into the noised branch at
    every step: the first token is contrasted as now, every later one is the plain logits under the
    plausibility cutoff."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    greedy = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with hg.wrap(model, methods=hg.VCDConfig(alpha=1.0, beta=0.1)):
            own = model.generate(**inputs, **greedy)
        with hg.wrap(model, methods=hg.VCDConfig(alpha=1.0, beta=0.1, branch_cache="per_step_copy")):
            release = model.generate(**inputs, **greedy)
        assert torch.equal(release.logits[0], own.logits[0])
        prompt = inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": release.sequences, "attention_mask": torch.ones_like(release.sequences)}
        plain = model(**full).logits[0, prompt - 1 : -1]  # step k: the logits after the first k tokens
    for step in range(1, 4):
        got, logits = release.logits[step][0], plain[step]
        cut = logits < logits.max() + torch.log(torch.tensor(0.1))
        assert torch.equal(torch.isinf(got), cut)
        torch.testing.assert_close(got[~cut], logits[~cut], rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(own.logits[1:], release.logits[1:]))


@pytest.mark.parametrize("name", ["vcd", "avc"])
def test_vcd_and_avisc_sample_by_default_as_their_official_runs(name):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with torch.no_grad(), hg.wrap(model, methods=name):
        torch.manual_seed(0)
        default = model.generate(**inputs, max_new_tokens=4)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=0)
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(default, sampled)
    assert not torch.equal(default, greedy)
