"""ONLY against its equations recomputed from scratch at every step: the whole sequence re-run
without a cache on eager attention (its probabilities returned), the layer's values recomputed from
its input, the head and key selection written out per row and head, the read-out at the last layer
and the total-variation rule."""

import math

import pytest
import torch
from tiny_models import build_model, image_token_id, make_inputs
from transformers import LogitsProcessorList

import halluguard as hg
from halluguard.methods.only.method import ONLY, ONLYData

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


class BruteForceONLY:
    def __init__(self, model, inputs, cfg):
        self.model, self.cfg = model, cfg
        self.extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        self.prompt_mask = inputs["attention_mask"]
        self.image_id = image_token_id(model)

    def selected(self, probs, text, image):
        """One row's probabilities ``(H, T)`` after the outlier and head selection, written out."""
        out = probs.clone()
        for h in range(probs.shape[0]):
            for keys in (text, image):
                p = probs[h, keys]
                out[h, keys] = torch.where(p > p.mean() + p.std(), 0.0, p)
        entropies = []
        for keys in (text, image):
            p = out[:, keys] / out[:, keys].sum(-1, keepdim=True)
            entropies.append(-(p * torch.log(p + 1e-6)).sum(-1))
        ratio = entropies[0] / entropies[1]
        out[ratio < ratio.mean()] = 0.0
        return out

    def intervened_logits(self, input_ids):
        model, cfg = self.model, self.cfg
        decoder = model.get_decoder()
        layer = decoder.layers[cfg.layer]
        last = decoder.layers[-1]
        seen = {}
        handles = [
            layer.register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("in", k.get("hidden_states", a[0] if a else None)), with_kwargs=True
            ),
            last.register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("residual", k.get("hidden_states", a[0] if a else None)),
                with_kwargs=True,
            ),
        ]
        mask = torch.cat(
            [
                self.prompt_mask,
                self.prompt_mask.new_ones(input_ids.shape[0], input_ids.shape[1] - self.prompt_mask.shape[1]),
            ],
            1,
        )
        grown = input_ids.shape[1] - self.prompt_mask.shape[1]
        extra = {  # token types grow with the generated (text) tokens
            k: torch.cat([v, v.new_zeros(v.shape[0], grown)], 1) if k.endswith("token_type_ids") else v
            for k, v in self.extra.items()
        }
        before = model.config.get_text_config()._attn_implementation
        model.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.no_grad():
                out = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    **extra,
                    output_attentions=True,
                    output_hidden_states=True,
                )
        finally:
            model.set_attn_implementation({"text_config": before})
            for h in handles:
                h.remove()
        probs = out.attentions[cfg.layer][:, :, -1].float()  # (B, H, T)
        attn = layer.self_attn
        values = attn.v_proj(layer.input_layernorm(seen["in"]))
        values = values.view(*values.shape[:2], -1, attn.head_dim).transpose(1, 2)
        values = values.repeat_interleave(probs.shape[1] // values.shape[1], dim=1).float()
        rows = []
        for b in range(input_ids.shape[0]):
            real = mask[b].bool()
            first = int(real.nonzero()[0])
            image = real & (input_ids[b] == self.image_id)
            text = real & ~image
            text[first] = False
            kept = self.selected(probs[b], text, image)
            heads = torch.stack([kept[h] @ values[b, h] for h in range(kept.shape[0])])
            rows.append(attn.o_proj(heads.reshape(-1)))
        carried = torch.stack(rows)
        u = last.input_layernorm(carried) + cfg.residual_weight * seen["residual"][:, -1]
        u = u + last.mlp(last.post_attention_layernorm(u))
        h = decoder.norm(u) + cfg.output_weight * out.hidden_states[-1][:, -1]
        return model.get_output_embeddings()(h).float()

    def __call__(self, input_ids, scores):
        cfg = self.cfg
        other = self.intervened_logits(input_ids)
        main = scores.float()
        tv = (main.softmax(-1) - other.softmax(-1)).abs().sum(-1, keepdim=True)
        mixed = torch.where(
            tv < cfg.gamma, main + cfg.alpha_pos * other, (1 + cfg.alpha_neg) * main - cfg.alpha_neg * other
        )
        return mixed.masked_fill(main < main.max(-1, keepdim=True).values + math.log(cfg.beta), float("-inf"))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])  # every step contrasts / every step adds (tv lies in [0, 2])
def test_only_equals_its_equations_recomputed_at_every_step(family, gamma):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    cfg = hg.get_config("only", alpha_pos=3.0, alpha_neg=3.0, beta=0.1, gamma=gamma)
    brute = BruteForceONLY(model, inputs, cfg)
    with torch.no_grad():
        want = model.generate(**inputs, **GEN, logits_processor=LogitsProcessorList([brute]))
        plain = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=cfg):
            got = model.generate(**inputs, **GEN)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_each_row_takes_the_rule_its_own_total_variation_picks():
    method = ONLY(hg.get_config("only", gamma=0.5, beta=0.0))
    main = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    other = torch.tensor([[2.0, 1.0, 0.1], [0.0, 1.0, 2.0]])  # row 0 agrees (tv 0.02), row 1 does not (tv 1.1)

    class State:
        @staticmethod
        def data_of(_):
            return ONLYData(logits=other)

    got = method.next_token_logits(State(), main)
    assert torch.allclose(got[0], main[0] + 3 * other[0])
    assert torch.allclose(got[1], 2 * main[1] - other[1])


def test_only_refuses_gemma_layers_and_a_last_layer():
    with pytest.raises(ValueError, match="layer layout"):
        hg.wrap(build_model("gemma3"), methods="only")
    model = build_model("llava")
    depth = model.config.get_text_config().num_hidden_layers
    with pytest.raises(ValueError, match="must be below the last"):
        hg.wrap(model, methods=hg.get_config("only", layer=depth - 1))


def test_only_samples_by_default_as_its_official_runs():
    caps = hg.registry.entry("only").capabilities_for()
    assert caps.generation_defaults == {"do_sample": True, "top_k": 0}
