"""MemVR against its equations written out with plain torch hooks: each row's image tokens taken
from the text model's input, the logit lens' top-10 entropy after each read layer, and the memory
read mixed into the next layer's feed-forward output, once per forward and row."""

import math

import pytest
import torch
from tiny_models import CORE_FAMILIES, build_model, image_token_id, make_inputs

import halluguard as hg
from halluguard.methods.memvr.method import top_entropy

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


class BruteForceMemVR:
    """Hooks that run MemVR on an unguarded model: ``f' = (1 - r) f + r (sum|f| / sum|a|) a`` with
    ``a = x Z^T Z`` over the real positions, in the layer after the first one (``start < l < end``)
    whose ``softmax(top10(W norm(h)))`` has entropy over ``ln 10`` above the threshold."""

    def __init__(self, model, ratio, threshold, start, end):
        self.model, self.ratio, self.threshold, self.start, self.end = model, ratio, threshold, start, end
        self.decoder = model.get_decoder()
        self.image_id = image_token_id(model)
        self.memory, self.target, self.mask, self.ids = None, None, None, None

    def before_model(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        self.ids = ids
        self.mask = kwargs.get("attention_mask")
        self.target = torch.full((ids.shape[0],), -1)

    def before_first_layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.memory is None:
            self.memory = [hidden[r, self.ids[r] == self.image_id] for r in range(hidden.shape[0])]

    def after_layer(self, layer_idx, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if not self.start < layer_idx < self.end:
            return
        for r in range(hidden.shape[0]):
            if self.target[r] < 0:
                lens = self.model.get_output_embeddings()(self.decoder.norm(hidden[r, -1]))
                p = torch.softmax(lens.float().topk(10).values, -1)
                if float(-(p * p.log()).sum() / math.log(10)) > self.threshold:
                    self.target[r] = layer_idx + 1

    def after_mlp(self, layer_idx, module, args, output):
        out = output.clone()
        real = self.mask[:, -output.shape[1] :].bool()
        for r in (self.target == layer_idx).nonzero().flatten().tolist():
            x, f, z = args[0][r][real[r]], output[r][real[r]], self.memory[r]
            read = (x @ z.T) @ z
            mixed = (1 - self.ratio) * f + self.ratio * f.abs().sum() / read.abs().sum() * read
            out[r][real[r]] = mixed
        return out

    def hooks(self):
        handles = [
            self.model.register_forward_pre_hook(self.before_model, with_kwargs=True),
            self.decoder.layers[0].register_forward_pre_hook(self.before_first_layer, with_kwargs=True),
        ]
        for i, layer in enumerate(self.decoder.layers):
            handles.append(layer.register_forward_hook(lambda m, a, o, i=i: self.after_layer(i, m, a, o)))
            handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: self.after_mlp(i, m, a, o)))
        return handles


def brute_and_guarded(family, ratio=0.9, threshold=0.0, **extra):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    depth = model.config.get_text_config().num_hidden_layers
    cfg = hg.get_config("memvr", retracing_ratio=ratio, entropy_threshold=threshold)
    start, end = round(5 * depth / 32), max(2, round(16 * depth / 32))  # the default layers
    brute = BruteForceMemVR(model, ratio, threshold, start, min(end, depth))
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN, **extra)
        handles = brute.hooks()
        try:
            want = model.generate(**inputs, **GEN, **extra)
        finally:
            for h in handles:
                h.remove()
        with hg.wrap(model, methods=cfg):
            got = model.generate(**inputs, **GEN, **extra)
    return got, want, plain


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_memvr_equals_its_equations(family):
    got, want, plain = brute_and_guarded(family)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_memvr_follows_beam_search():
    got, want, _ = brute_and_guarded("llava", num_beams=3)
    assert torch.equal(got, want)


def test_no_retracing_above_every_entropy_is_plain_decoding():
    got, _, plain = brute_and_guarded("llava", threshold=1.0)
    assert torch.equal(got, plain)


def test_top_entropy_is_the_normalised_entropy_of_the_ten_largest():
    logits = torch.tensor([[0.0] * 10 + [-1e9] * 5, [10.0] + [0.0] * 14])
    got = top_entropy(logits)
    assert got[0] == pytest.approx(1.0)
    p = torch.softmax(torch.tensor([10.0] + [0.0] * 9), -1)
    assert got[1] == pytest.approx(float(-(p * p.log()).sum() / math.log(10)))


def test_layers_that_leave_none_to_read_are_refused():
    with pytest.raises(ValueError, match="leaves no layer"):
        hg.get_config("memvr", start_layer=3, end_layer=4)
    with pytest.raises(ValueError, match="leave none to read"):
        hg.wrap(build_model("llava"), methods=hg.get_config("memvr", start_layer=5, end_layer=20))
