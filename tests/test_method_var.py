"""VAR: sink detection from the residual stream, image-centric selection, proportional redistribution."""

import pytest
import torch
from probes import assert_batch_rows_equal_single_rows, text_attention
from tiny_models import build_model, make_inputs
from transformers.masking_utils import eager_mask

import halluguard as hg
from halluguard.adapters import adapter_for
from halluguard.calibrate.sink_dims import find_sink_dims

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
# Tiny random models have no massive activations: two ordinary dimensions and a low threshold make
# a realistic mix of text and visual sinks.
TEST_VAR = dict(sink_dims=(5, 9), tau=1.8, rho=0.9, summ=0.2, p=0.3)


class BruteForceVAR:
    """VAR written out literally: layer pre-hooks find sinks, an eager attention loops over (row, head, query)."""

    def __init__(self, model, inputs, sink_dims, tau, p, rho, summ, first_layer=2, visual_rule=True):
        self.visual_rule = visual_rule
        self.model, self.dims, self.tau, self.keep, self.rho, self.summ = model, list(sink_dims), tau, p, rho, summ
        self.first_layer = first_layer
        ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
        self.valid = valid
        self.image = (ids == 500) & valid
        self.image_end = [int(torch.nonzero(row).max()) + 1 for row in self.image]
        self.prompt_len = ids.shape[1]
        self.sinks = {}
        self.text_only_layers = set()  # (row, layer) whose sinks are all text tokens

    def layer_input(self, layer_idx):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).float()
            if layer_idx < self.first_layer or x.shape[1] != self.prompt_len:
                return
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()
            phi = (x[..., self.dims].abs() / rms).amax(-1)
            self.sinks[layer_idx] = (phi > self.tau) & self.valid

        return hook

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
        z = (query.float() @ k.transpose(-1, -2)) * module.scaling
        if attention_mask is not None:
            z = z + attention_mask.float()
        a = torch.softmax(z, -1)
        layer, kv_len, q_len = module.layer_idx, k.shape[2], query.shape[2]
        if layer >= self.first_layer:
            sinks = torch.nn.functional.pad(self.sinks[layer], (0, kv_len - self.prompt_len))
            image = torch.nn.functional.pad(self.image, (0, kv_len - self.prompt_len))
            for b in range(a.shape[0]):
                if self.visual_rule and not (image[b] & sinks[b]).any():  # text sinks only: left alone
                    self.text_only_layers.add((b, layer))
                    continue
                for h in range(a.shape[1]):
                    for i in range(q_len):
                        if kv_len - q_len + i < self.image_end[b]:
                            continue
                        row = a[b, h, i].clone()
                        m_img = row[image[b]].sum()
                        m_vis_sink = row[image[b] & sinks[b]].sum()
                        target = image[b] & ~sinks[b]
                        if m_img < self.summ or m_vis_sink > self.rho * m_img or row[target].sum() == 0:
                            continue
                        budget = (1 - self.keep) * row[sinks[b]].sum()
                        new = row.clone()
                        new[sinks[b]] = self.keep * row[sinks[b]]
                        new[target] = row[target] + budget * row[target] / row[target].sum()
                        a[b, h, i] = new
        return (a @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    def __enter__(self):
        self.attention_scope = text_attention(self.model, "var_brute_force", self.attention, eager_mask)
        self.attention_scope.__enter__()
        self.handles = [
            layer.register_forward_pre_hook(self.layer_input(i), with_kwargs=True)
            for i, layer in enumerate(adapter_for(self.model).decoder_layers())
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.attention_scope.__exit__(*exc)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "llava_next"])
def test_var_equals_the_brute_force_computation(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    cfg = hg.VARConfig(**TEST_VAR, first_layer=1)
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN)
        with BruteForceVAR(model, inputs, first_layer=1, **TEST_VAR):
            want_logits = model(**inputs).logits
            want = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=cfg) as guard:
            got_logits = guard.forward(**inputs).logits
            got = model.generate(**inputs, **GEN)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain) or (got_logits - model(**inputs).logits).abs().max() > 1e-4


def test_a_layer_whose_sinks_are_all_text_tokens_is_left_alone():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with torch.no_grad():
        with BruteForceVAR(model, inputs, first_layer=1, **TEST_VAR) as brute:
            want = model(**inputs).logits
        with BruteForceVAR(model, inputs, first_layer=1, visual_rule=False, **TEST_VAR):
            without_rule = model(**inputs).logits
        with hg.wrap(model, methods=hg.VARConfig(**TEST_VAR, first_layer=1)) as guard:
            got = guard.forward(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert brute.text_only_layers  # some (row, layer) has text sinks only
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert (without_rule[real] - want[real]).abs().max() > 1e-3  # the rule matters here


def test_edited_attention_rows_still_sum_to_one():
    model = build_model("llava", attn_implementation="eager")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods=hg.VARConfig(**TEST_VAR)) as guard, torch.no_grad():
        maps = guard.forward(**inputs, output_attentions=True).attentions
        plain = [m for m in model(**inputs, output_attentions=True).attentions]
    real = inputs["attention_mask"].bool()
    for layer in (2,):
        rows = maps[layer].permute(0, 2, 1, 3)[real]  # (tokens, H, T)
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), atol=1e-5, rtol=0)
        assert (maps[layer] - plain[layer]).abs().max() > 1e-3  # the redistribution happened


def test_batch_rows_equal_single_rows():
    model = build_model("qwen2_vl")
    inputs, _ = make_inputs(model, "qwen2_vl")
    with hg.wrap(model, methods=hg.VARConfig(**TEST_VAR, first_layer=1)):
        assert_batch_rows_equal_single_rows(model, inputs, "qwen2_vl", GEN)


def test_var_options_and_errors():
    model = build_model("llava")
    with pytest.raises(ValueError, match="calibrate sink-dims"):
        hg.wrap(model, methods="var")  # tiny llama: not in the table
    with pytest.raises(ValueError, match="hidden size"):
        hg.wrap(model, methods=hg.VARConfig(sink_dims=(999,)))
    with pytest.raises(ValueError, match="none in this 3-layer model"):
        hg.wrap(model, methods=hg.VARConfig(sink_dims=(1,), first_layer=2, skip_last_layer=True))
    with hg.wrap(model, methods=hg.VARConfig(sink_dims=(1,), skip_last_layer=True, first_layer=1)) as guard:
        assert list(guard.methods[0].layers) == [1]


def test_sink_dims_calibration_finds_planted_dimensions():
    model = build_model("llava")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        scale = emb[1].abs().max().clone()
        emb[1, 7] = 40 * scale  # BOS carries massive values in dims 7 and 33
        emb[1, 33] = -30 * scale
    # with hidden size 64 a ratio |x_d| / RMS(x) is at most 8, so the threshold is scaled down from 20
    result = find_sink_dims(model, torch.tensor([[1, 20, 21, 22, 23]]), tau=4.0)
    assert sorted(result["sink_dims"]) == [7, 33]
    plain = build_model("llava")
    assert find_sink_dims(plain, torch.tensor([[1, 20, 21, 22, 23]]), tau=4.0)["sink_dims"] == []


def backbone(model_type, hidden, layers, kv_heads, vocab):
    """A stand-in adapter with a text backbone's identifying numbers."""
    from types import SimpleNamespace

    config = SimpleNamespace(model_type=model_type, hidden_size=hidden, vocab_size=vocab)
    return SimpleNamespace(text_config=config, num_layers=layers, num_kv_heads=kv_heads)


def test_the_sink_dimension_table_matches_only_its_own_backbones():
    from halluguard.methods.var.method import known_sink_dims

    assert known_sink_dims(backbone("llama", 4096, 32, 32, 32064)) == (1415, 2533)  # llava-1.5-7b-hf
    assert known_sink_dims(backbone("llama", 4096, 32, 32, 32000)) == (1415, 2533)  # LLaMA-2-7B
    assert known_sink_dims(backbone("llama", 5120, 40, 40, 32064)) == (2100, 4743)  # llava-1.5-13b-hf
    assert known_sink_dims(backbone("qwen2_vl_text", 3584, 28, 4, 152064)) == (458, 2570)
    assert known_sink_dims(backbone("llama", 4096, 32, 8, 128256)) is None  # LLaMA-3-8B: same width and depth
    assert known_sink_dims(backbone("mistral", 4096, 32, 8, 32768)) is None


def test_sink_dims_from_the_calibration_file_act_as_the_numbers_do(tmp_path):
    import json
    import warnings

    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    file = tmp_path / "dims.json"
    file.write_text(json.dumps({"sink_dims": list(TEST_VAR["sink_dims"]), "model": "", "tau": 20.0}))
    with torch.no_grad():
        with hg.wrap(model, methods=hg.get_config("var", **TEST_VAR)):
            want = model.generate(**inputs, **GEN)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with hg.wrap(model, methods=hg.get_config("var", **dict(TEST_VAR, sink_dims=str(file)))):
                assert torch.equal(model.generate(**inputs, **GEN), want)
    found_elsewhere = tmp_path / "other.json"
    found_elsewhere.write_text(json.dumps({"sink_dims": [5, 9], "model": "llava-hf/llava-1.5-7b-hf"}))
    model.name_or_path = "someone/tiny-llava"
    names = "found for 'llava-hf/llava-1.5-7b-hf', and this model is 'someone/tiny-llava'"
    with pytest.warns(UserWarning, match=names):
        hg.wrap(model, methods=hg.get_config("var", **dict(TEST_VAR, sink_dims=str(found_elsewhere)))).unwrap()


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json", "cannot read sink dimensions"), ('{"sink_dims": []}', "holds no sink dimensions"),
     ('{"sink_dims": ["5"]}', "holds no sink dimensions"), ('{"sink_dims": [5, 99999]}', "below the hidden size")],
)  # fmt: skip
def test_a_bad_sink_dims_file_is_refused_with_its_name(content, message, tmp_path):
    file = tmp_path / "dims.json"
    file.write_text(content)
    with pytest.raises(ValueError, match=message):
        hg.wrap(build_model("llava"), methods=hg.get_config("var", **dict(TEST_VAR, sink_dims=str(file))))
