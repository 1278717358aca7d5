"""M3ID: contrast with the image-free distribution under the weight exp(lamda t) - 1, while the
image-conditioned model is unsure, against the equations written out with the image-free prompt
re-run in full at every step."""

import math

import pytest
import torch
from test_method_pai import BruteForceGuidance
from tiny_models import CORE_FAMILIES, build_model, make_inputs
from transformers import LogitsProcessorList

import halluguard as hg
from halluguard.methods.m3id.method import image_weight

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


class BruteForceM3ID(BruteForceGuidance):
    """``l_c + w_t (l_c - l_u)`` where ``max p_c < confidence``, ``w_t = exp(lamda t) - 1``, ``t`` the
    generated token's number (from ``first_step``), the image-free logits re-run without a cache."""

    def __init__(self, model, family, inputs, lamda, confidence, beta=0.0, first_step=1):
        super().__init__(model, family, inputs, gamma=1.0, beta=beta)
        self.lamda, self.confidence, self.first_step = lamda, confidence, first_step
        self.weights = []

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_len + self.first_step
        w = math.exp(self.lamda * t) - 1
        self.weights.append(w)
        image_free = self.image_free(input_ids)
        c = torch.log_softmax(scores.float(), -1)
        u = torch.log_softmax(image_free.float(), -1)
        unsure = c.exp().amax(-1, keepdim=True) < self.confidence
        out = torch.where(unsure, c + w * (c - u), c)
        if self.beta:
            out = out.masked_fill(c < c.max(-1, keepdim=True).values + math.log(self.beta), float("-inf"))
        return out


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("stream", ["rows", "separate"])
def test_m3id_equals_its_equations_with_the_image_free_prompt_rerun(family, stream):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    brute = BruteForceM3ID(model, family, inputs, lamda=0.6, confidence=1.0)
    cfg = hg.get_config("m3id", lamda=0.6, confidence=1.0, separate_stream=stream == "separate")
    with torch.no_grad():
        want = model.generate(**inputs, **GEN, logits_processor=LogitsProcessorList([brute]))
        plain = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=cfg):
            got = model.generate(**inputs, **GEN)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)
    assert brute.weights == pytest.approx([math.expm1(0.6 * t) for t in range(1, 7)])  # t = 1, 2, ... 6


def test_the_weight_follows_the_schedule_and_the_gate_and_cutoff_apply():
    assert image_weight(0.02, 1) == pytest.approx(math.exp(0.02) - 1)
    assert image_weight(0.02, 100) == pytest.approx(math.exp(2) - 1)
    assert image_weight(0.0, 50) == 0.0
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    for settings in (dict(confidence=0.001), dict(confidence=1.0, beta=0.2, first_step=0)):
        brute = BruteForceM3ID(model, "llava", inputs, lamda=0.6, **settings)
        with torch.no_grad():
            want = model.generate(**inputs, **GEN, logits_processor=LogitsProcessorList([brute]))
            with hg.wrap(model, methods=hg.get_config("m3id", lamda=0.6, **settings)):
                got = model.generate(**inputs, **GEN)
        assert torch.equal(got, want)
    # a gate no row passes: plain decoding
    with torch.no_grad(), hg.wrap(model, methods=hg.get_config("m3id", lamda=0.6, confidence=1e-9)):
        assert torch.equal(model.generate(**inputs, **GEN), model.__class__.generate(model, **inputs, **GEN))


def test_neutral_m3id_runs_no_branch():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods=hg.get_config("m3id").__class__.neutral()) as guard:
        assert guard.methods[0].streams(None, inputs) == []
