"""VISTA against its equations written out with plain torch hooks: the steering vectors from two
unguarded forwards (the batch as given; each row's image-free prompt alone), the rotation on every
feed-forward output, and self-logits augmentation as a logits processor."""

import contextlib

import pytest
import torch
from test_method_vhr import text_only
from tiny_models import CORE_FAMILIES, build_model, make_inputs, row_inputs
from transformers import LogitsProcessorList

import halluguard as hg
from halluguard.adapters import adapter_for

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def layer_output(output):
    return output[0] if isinstance(output, tuple) else output


class BruteForceVISTA:
    """``v_l = h_l(prompt) - h_l(prompt without image)`` at the last token; every feed-forward output
    ``x`` of layer ``l`` becomes ``|x| normalize(x/|x| + lamda (1 + max(0, cos(x, -v_l))) v_l/|v_l|)``;
    the scores become ``(1 - a) z + a W mean_l h_l`` over the late window."""

    def __init__(self, model, family, inputs, lamda, alpha, window):
        self.model, self.lamda, self.alpha, self.window = model, lamda, alpha, window
        self.layers = model.get_decoder().layers
        self.vectors = self.last_token_outputs(inputs) - torch.stack(
            [
                self.last_token_outputs(text_only(row_inputs(inputs, r, family)))[:, 0]
                for r in range(len(inputs["input_ids"]))
            ],
            1,
        )
        self.late = {}

    def last_token_outputs(self, inputs):
        """``(layers, rows, d)``: each layer's output at the last position, unguarded."""
        kept = {}
        handles = [
            layer.register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(i, layer_output(o)[:, -1].float()))
            for i, layer in enumerate(self.layers)
        ]
        try:
            with torch.no_grad():
                self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        return torch.stack([kept[i] for i in range(len(self.layers))])

    def rotate(self, layer_idx, output):
        v = self.vectors[layer_idx]
        v = v.repeat_interleave(output.shape[0] // v.shape[0], 0)[:, None, :]
        x = output.float()
        length = x.norm(dim=-1, keepdim=True)
        safe = length.clamp_min(1e-12)  # padding positions hold zero vectors, kept zero (as F.normalize does)
        cos = (x * -v).sum(-1, keepdim=True) / (safe * v.norm(dim=-1, keepdim=True))
        turned = x / safe + self.lamda * (1 + cos.clamp_min(0)) * v / v.norm(dim=-1, keepdim=True)
        return turned / turned.norm(dim=-1, keepdim=True) * length

    @contextlib.contextmanager
    def installed(self):
        handles = []
        if self.lamda:
            handles += [
                layer.mlp.register_forward_hook(lambda m, a, o, i=i: self.rotate(i, o))
                for i, layer in enumerate(self.layers)
            ]
        handles += [
            layer.register_forward_hook(lambda m, a, o, i=i: self.late.__setitem__(i, layer_output(o)[:, -1].float()))
            for i, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def __call__(self, input_ids, scores):
        mean = torch.stack([self.late[i] for i in self.window]).mean(0)
        return (1 - self.alpha) * scores + self.alpha * self.model.get_output_embeddings()(mean).float()


def brute_and_guarded(family, settings, window, **extra):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    cfg = hg.get_config("vista", **settings)
    brute = BruteForceVISTA(model, family, inputs, cfg.lamda, cfg.logits_alpha, window)
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN, **extra)
        with brute.installed():
            want = model.generate(**inputs, **GEN, **extra, logits_processor=LogitsProcessorList([brute]))
        with hg.wrap(model, methods=cfg):
            got = model.generate(**inputs, **GEN, **extra)
    return got, want, plain


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_vista_equals_its_equations(family):
    depth = build_model(family).config.get_text_config().num_hidden_layers
    late = depth - 2
    first = min(round(25 * depth / 32), late)
    window = range(first, max(first, min(round(30 * depth / 32), late)) + 1)  # the default, scaled from 25..30 of 32
    got, want, plain = brute_and_guarded(family, dict(lamda=0.8), window)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


@pytest.mark.parametrize("part", ["steering", "augmentation"])
def test_each_part_acts_alone_as_its_equation(part):
    settings = dict(lamda=0.8, logits_alpha=0.0) if part == "steering" else dict(lamda=0.0, logits_alpha=0.7)
    settings.update(logits_first_layer=0, logits_last_layer=1)
    got, want, plain = brute_and_guarded("llava", settings, range(0, 2))
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_vista_follows_beam_search():
    got, want, _ = brute_and_guarded("llava", dict(lamda=0.8, logits_first_layer=0), range(0, 1 + 1), num_beams=3)
    assert torch.equal(got, want)


def test_vista_runs_one_extra_forward_for_the_vectors_and_none_when_neutral():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    counted = []
    handle = model.register_forward_pre_hook(lambda m, a: counted.append(1))
    try:
        for cfg, extra in ((hg.get_config("vista"), 1), (hg.VISTAConfig.neutral(), 0)):
            counted.clear()
            with torch.no_grad(), hg.wrap(model, methods=cfg):
                model.generate(**inputs, **GEN)
            assert len(counted) == GEN["max_new_tokens"] + extra
    finally:
        handle.remove()


def test_bad_layers_are_refused():
    model = build_model("llava")
    with pytest.raises(ValueError, match="logits layers"):
        hg.wrap(model, methods=hg.get_config("vista", logits_first_layer=40, logits_last_layer=41))
    with pytest.raises(ValueError, match="steer_end_layer"):
        hg.get_config("vista", steer_start_layer=3, steer_end_layer=2)
    assert adapter_for(model).num_layers == model.config.get_text_config().num_hidden_layers
