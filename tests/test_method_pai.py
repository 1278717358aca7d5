"""PAI: image-key logit amplification on the last query row, layers [start, end)."""

import math

import pytest
import torch
from probes import assert_batch_rows_equal_single_rows, text_attention
from test_method_vhr import text_only
from tiny_models import build_model, make_inputs, row_inputs
from transformers import LogitsProcessorList
from transformers.masking_utils import eager_mask

import halluguard as hg
from halluguard.attention import hook
from halluguard.decoding import contrast

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def brute_force_pai_logits(model, inputs, alpha, layers):
    """Prefill logits with PAI written out as an eager attention that edits the last row's image logits."""
    image = (inputs["input_ids"] == 500) & inputs["attention_mask"].bool()
    eager = hook._eager_for(hg.adapters.adapter_for(model).attention_modules()[0])

    def attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx not in layers:
            return eager(module, query, key, value, attention_mask, **kwargs)
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        v = value.repeat_interleave(groups, 1)
        z = (query @ k.transpose(-1, -2)) * module.scaling
        last = z[:, :, -1, :]
        boosted = torch.where(image[:, None, :], last + alpha * last.abs(), last)
        z = torch.cat([z[:, :, :-1], boosted[:, :, None]], dim=2) + attention_mask
        out = torch.softmax(z.float(), -1).to(v.dtype) @ v
        return out.transpose(1, 2).contiguous(), None

    with text_attention(model, "pai_brute_force", attention, eager_mask), torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "gemma3"])
def test_pai_equals_a_brute_force_eager_edit(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    cfg = hg.PAIConfig(alpha=0.5, start_layer=1, use_cfg=False)
    want = brute_force_pai_logits(model, inputs, 0.5, layers={1, 2})
    with hg.wrap(model, methods=cfg) as guard, torch.no_grad():
        got = guard.forward(**inputs).logits
        plain = model(**inputs).logits
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, :-1], plain[:, :-1])  # only the last row is edited
    assert (got[:, -1] - plain[:, -1]).abs().max() > 1e-4  # (random tiny models have small logits)


def test_batch_rows_equal_single_rows():
    model = build_model("llava_next")  # rows with different AnyRes image lengths
    inputs, _ = make_inputs(model, "llava_next")
    with hg.wrap(model, methods=hg.PAIConfig(alpha=0.8, start_layer=0, gamma=2.0)):
        assert_batch_rows_equal_single_rows(model, inputs, "llava_next", GEN)


def test_strong_pai_changes_greedy_sampling_and_beam_outputs():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with torch.no_grad():
        plain = [model.generate(**inputs, **GEN), model.generate(**inputs, **GEN, num_beams=3)]
        with hg.wrap(model, methods=hg.PAIConfig(alpha=3.0, start_layer=0)):
            edited = [model.generate(**inputs, **GEN), model.generate(**inputs, **GEN, num_beams=3)]
            torch.manual_seed(0)
            sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    assert any(not torch.equal(a, b) for a, b in zip(plain, edited))
    assert sampled.shape[1] == inputs["input_ids"].shape[1] + 6


def test_pai_config_errors():
    model = build_model("llava")
    with pytest.raises(ValueError, match="select none"):
        hg.wrap(model, methods=hg.PAIConfig(start_layer=7))
    assert not hasattr(model, "_halluguard_guard")


# ---- image-free guidance (use_cfg) -------------------------------------------------------------


class BruteForceGuidance:
    """PAI's guidance written out: the image-free prompt re-run in full, without a cache, every step."""

    def __init__(self, model, family, inputs, gamma, beta):
        self.model, self.gamma, self.beta = model, gamma, beta
        self.prompt_len = inputs["input_ids"].shape[1]
        self.rows = [text_only(row_inputs(inputs, r, family)) for r in range(inputs["input_ids"].shape[0])]

    def image_free(self, input_ids):
        """Each row's next-token logits for its prompt without the image, plus its generated tokens."""
        group = input_ids.shape[0] // len(self.rows)
        side = []
        for i in range(input_ids.shape[0]):
            prompt = self.rows[i // group]
            ids = torch.cat([prompt["input_ids"][0], input_ids[i, self.prompt_len :]])[None]
            extra = {k: torch.zeros_like(ids) for k in prompt if k.endswith("token_type_ids")}
            with torch.no_grad():
                side.append(self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1])
        return torch.stack(side)

    def __call__(self, input_ids, scores):
        s = torch.log_softmax(scores.float(), -1)
        u = torch.log_softmax(self.image_free(input_ids).float(), -1)
        out = self.gamma * (s - u) + u
        return out.masked_fill(s < s.max(-1, keepdim=True).values + math.log(self.beta), float("-inf"))


CASES = [
    ("llava", "greedy", "rows"),
    ("qwen2_vl", "greedy", "rows"),
    ("gemma3", "greedy", "rows"),
    ("llava", "beam", "rows"),
    ("idefics3", "beam", "rows"),
    ("llava", "sequences", "rows"),
    ("qwen2_vl", "beam", "separate"),
    ("llava", "sequences", "separate"),
    ("gemma3", "greedy", "static cache"),
]


@pytest.mark.parametrize("family,search,stream", CASES)
def test_guidance_equals_a_brute_force_image_free_branch(family, search, stream):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    extra = {"greedy": {}, "beam": {"num_beams": 3}, "sequences": {"num_beams": 2, "num_return_sequences": 2}}[search]
    if stream == "static cache":
        extra["cache_implementation"] = "static"
    brute = BruteForceGuidance(model, family, inputs, gamma=3.0, beta=0.1)
    cfg = hg.PAIConfig(alpha=0.0, gamma=3.0, beta=0.1, separate_stream=stream == "separate")
    with torch.no_grad():
        want = model.generate(**inputs, **GEN, **extra, logits_processor=LogitsProcessorList([brute]))
        plain = model.generate(**inputs, **GEN, **extra)
        with hg.wrap(model, methods=cfg):
            got = model.generate(**inputs, **GEN, **extra)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_default_is_amplification_and_guidance_as_run_officially():
    cfg = hg.PAIConfig()
    assert (cfg.alpha, cfg.use_cfg, cfg.gamma, cfg.beta, cfg.amplify_first_token) == (0.2, True, 1.1, 0.1, False)


def first_step_logits(model, inputs, methods):
    with hg.wrap(model, methods=methods), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    return out.logits[0]


def test_with_guidance_the_first_token_forward_is_not_amplified_unless_asked():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    unamplified = first_step_logits(model, inputs, hg.PAIConfig(alpha=0.0, start_layer=0, gamma=1.5))
    guided = first_step_logits(model, inputs, hg.PAIConfig(alpha=3.0, start_layer=0, gamma=1.5))
    assert torch.equal(guided, unamplified)
    asked = first_step_logits(
        model, inputs, hg.PAIConfig(alpha=3.0, start_layer=0, gamma=1.5, amplify_first_token=True)
    )
    assert (asked - unamplified).abs().max() > 1e-4


def test_guidance_on_at_gamma_one_is_plain_decoding_as_in_the_official_code():
    """The official processor returns before its first image-free pass at gamma 1, so the flag that
    holds amplification back is never cleared: not one forward is amplified."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
        with hg.wrap(model, methods=hg.PAIConfig(alpha=3.0, start_layer=0, gamma=1.0)):
            guided = model.generate(**inputs, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
        with hg.wrap(model, methods=hg.PAIConfig(alpha=3.0, start_layer=0, use_cfg=False)):
            alone = model.generate(**inputs, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    assert all(torch.equal(a, b) for a, b in zip(guided.logits, plain.logits))
    assert max(float((a - b).abs().max()) for a, b in zip(alone.logits, plain.logits)) > 1e-4


def test_the_control_row_keeps_amplification_and_the_cutoff_without_the_image_free_branch():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    greedy = dict(
        max_new_tokens=4, do_sample=False, output_logits=True, output_scores=True, return_dict_in_generate=True
    )
    amplified = dict(alpha=3.0, start_layer=0, amplify_first_token=True)
    with torch.no_grad():
        with hg.wrap(model, methods=hg.PAIConfig(**amplified, use_cfg=False)):
            alone = model.generate(**inputs, **greedy)
        with hg.wrap(model, methods=hg.PAIConfig(**amplified, gamma=1.5, control=True)) as guard:
            control = model.generate(**inputs, **greedy)
            assert guard.methods[0].streams(None, {}) == []  # no image-free branch
    assert torch.equal(control.sequences, alone.sequences)
    for got, logits in zip(control.scores, alone.logits):
        expected = contrast(logits, logits, 1.0, 0.0, space="log_probs", beta=0.1)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = ~torch.isinf(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_gamma_one_returns_the_scores_unchanged_without_a_cutoff():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    sample = dict(max_new_tokens=8, do_sample=True, top_k=0)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = model.generate(**inputs, **sample)
        with hg.wrap(model, methods=hg.PAIConfig(alpha=0.0, gamma=1.0, beta=0.9)):
            torch.manual_seed(3)
            got = model.generate(**inputs, **sample)
        # the cutoff alone (what gamma 1 would do if it still cut) changes these samples
        cut = LogitsProcessorList([lambda ids, scores: contrast(scores, scores, 1.0, 0.0, beta=0.9)])
        torch.manual_seed(3)
        with_cut = model.generate(**inputs, **sample, logits_processor=cut)
    assert torch.equal(got, plain)
    assert not torch.equal(with_cut, plain)


def test_guidance_with_amplification_runs_greedy_sampling_and_beam():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods=hg.PAIConfig(alpha=0.5)), torch.no_grad():
        greedy = model.generate(**inputs, **GEN)
        beam = model.generate(**inputs, **GEN, num_beams=2)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    for out in (greedy, beam, sampled):
        assert out.shape == (2, inputs["input_ids"].shape[1] + 6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize("search", [{}, {"num_beams": 2}])
def test_amplified_rows_beside_their_image_free_rows_equal_two_separate_forwards(family, search):
    """At a decode step the amplified rows and the image-free rows take one edited attention call
    (a zero boost on the image-free rows): every step's scores equal those of the image-free prompt
    run as a forward of its own."""
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    runs = {}
    with torch.no_grad():
        for separate in (False, True):
            with hg.wrap(model, methods=hg.PAIConfig(alpha=0.5, gamma=2.0, separate_stream=separate)):
                runs[separate] = model.generate(
                    **inputs, **GEN, **search, output_scores=True, return_dict_in_generate=True
                )
        plain = model.generate(**inputs, **GEN, **search)
    assert torch.equal(runs[False].sequences, runs[True].sequences)
    assert not torch.equal(runs[False].sequences, plain)
    for rows, apart in zip(runs[False].scores, runs[True].scores):
        kept = torch.isfinite(apart)
        assert torch.equal(kept, torch.isfinite(rows))
        torch.testing.assert_close(rows[kept], apart[kept], rtol=1e-5, atol=1e-5)


def test_guidance_math_by_hand():
    scores = torch.tensor([[2.0, 1.0, -3.0]])
    side = torch.tensor([[0.0, 1.0, 0.0]])
    s, u = torch.log_softmax(scores, -1), torch.log_softmax(side, -1)
    got = contrast(scores, side, 2.0, 1.0, beta=0.1)
    assert torch.allclose(got[0, :2], (2 * (s - u) + u)[0, :2])
    assert got[0, 2] == float("-inf")  # s[2] < max(s) + ln 0.1
    assert torch.allclose(contrast(scores, side, 1.0, 0.0), s)
    logits = contrast(scores, side, 2.0, 1.0, space="logits", beta=0.1)
    assert torch.allclose(logits[0, :2], (2 * scores - side)[0, :2]) and logits[0, 2] == float("-inf")


def test_guidance_keeps_ruled_out_tokens_out_even_at_gamma_zero():
    scores = torch.tensor([[2.0, float("-inf"), 0.0]])
    got = contrast(scores, torch.zeros(1, 3), 0.0, -1.0)
    assert got[0, 1] == float("-inf") and not got.isnan().any()


def test_guarded_forward_refuses_guidance_it_cannot_apply():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods="pai") as guard, pytest.raises(ValueError, match="use generate"):
        guard.forward(**inputs)
