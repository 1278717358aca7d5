"""ICD: contrast with a disturbance instruction before the prompt, against the official formula with
the disturbed prompt (prefix after BOS, same image) re-run in full, without a cache, at every step."""

import math

import pytest
import torch
from tiny_models import CORE_FAMILIES, build_model, make_inputs, row_inputs
from transformers import LogitsProcessor, LogitsProcessorList

import halluguard as hg
from halluguard.decoding.layout import prefixed_rows

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
PREFIX = (11, 12, 13, 14)


class BruteForceICD(LogitsProcessor):
    """``(1 + alpha) l - alpha l'`` under the cutoff on ``l``, ``l'`` from each row's prompt with the
    prefix after its BOS and the same image, plus its generated tokens, run without a cache."""

    def __init__(self, model, family, inputs, alpha, beta):
        self.model, self.alpha, self.beta = model, alpha, beta
        self.prompt_len = inputs["input_ids"].shape[1]
        self.rows = [row_inputs(inputs, r, family) for r in range(inputs["input_ids"].shape[0])]
        self.bos = model.config.get_text_config().bos_token_id

    def disturbed(self, row, generated):
        ids = row["input_ids"][0].tolist()
        at = 1 if ids[0] == self.bos else 0
        ids = ids[:at] + list(PREFIX) + ids[at:] + generated
        out = dict(row, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        for name in ("token_type_ids", "mm_token_type_ids"):
            if name in row:
                types = row[name][0].tolist()
                out[name] = torch.tensor([types[:at] + [0] * len(PREFIX) + types[at:] + [0] * len(generated)])
        return out

    def __call__(self, input_ids, scores):
        group = input_ids.shape[0] // len(self.rows)
        other = []
        for i in range(input_ids.shape[0]):
            inputs = self.disturbed(self.rows[i // group], input_ids[i, self.prompt_len :].tolist())
            with torch.no_grad():
                other.append(self.model(**inputs).logits[0, -1])
        s, o = scores.float(), torch.stack(other).float()
        out = (1 + self.alpha) * s - self.alpha * o
        return out.masked_fill(s < s.max(-1, keepdim=True).values + math.log(self.beta), float("-inf"))


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("beams", [1, 2])
def test_icd_equals_the_official_formula_with_the_disturbed_prompt_rerun(family, beams):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    cfg = hg.get_config("icd", alpha=1.0, beta=0.1, prefix_ids=PREFIX)
    extra = {"num_beams": beams} if beams > 1 else {}
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN, **extra)
        with hg.wrap(model, methods=cfg):
            got = model.generate(**inputs, **GEN, **extra)
        if beams == 1:
            brute = BruteForceICD(model, family, inputs, alpha=1.0, beta=0.1)
            want = model.generate(**inputs, **GEN, logits_processor=LogitsProcessorList([brute]))
            assert torch.equal(got, want)
    assert not torch.equal(got, plain)


def test_the_prefix_goes_after_bos_and_positions_shift_past_it():
    ids = torch.tensor([[0, 0, 1, 7, 8], [1, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    rows = prefixed_rows(
        {"input_ids": ids, "attention_mask": mask, "position_ids": positions[None].expand(3, -1, -1), "pixel": 1},
        torch.tensor([40, 41]),
        torch.tensor([True, True]),
    )
    assert rows["input_ids"].tolist() == [[0, 0, 1, 40, 41, 7, 8], [1, 40, 41, 5, 6, 7, 8]]
    assert rows["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert rows["position_ids"][0].tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    assert torch.equal(rows["position_ids"][2], rows["position_ids"][0]) and rows["pixel"] == 1
    first = prefixed_rows({"input_ids": ids, "attention_mask": mask}, torch.tensor([40]), torch.tensor([False, False]))
    assert first["input_ids"].tolist() == [[0, 0, 40, 1, 7, 8], [40, 1, 5, 6, 7, 8]]


def test_icd_needs_a_tokenizer_or_prefix_ids_and_defaults_to_sampling():
    model = build_model("llava")
    with pytest.raises(ValueError, match="wrap\\(model, processor, 'icd'\\), or give the instruction as prefix_ids"):
        hg.wrap(model, methods="icd")
    with pytest.raises(ValueError, match="prefix_ids must be a non-empty list"):
        hg.get_config("icd", prefix_ids=())
    assert hg.registry.entry("icd").capabilities_for().generation_defaults == {"do_sample": True, "top_k": 0}


def count_forwards(model):
    """(rows, width) of every model forward, seen after the guard's hook (its extra rows and columns)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_the_disturbed_branch_rides_along_as_rows_and_agrees_with_its_own_forwards(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    rows, width = inputs["input_ids"].shape
    with torch.no_grad():
        got = {}
        for separate in (False, True):
            cfg = hg.get_config("icd", prefix_ids=PREFIX, separate_stream=separate)
            with hg.wrap(model, methods=cfg):
                seen, handle = count_forwards(model)
                got[separate] = model.generate(**inputs, **GEN)
                handle.remove()
            if not separate:  # the prompt widened by the prefix, the branch's prefill, then one forward a step
                assert seen[0] == (rows, width + len(PREFIX)) and seen[1][0] == rows
                assert seen[2:] == [(2 * rows, 1)] * (GEN["max_new_tokens"] - 1)
            else:
                assert (2 * rows, 1) not in seen
    assert torch.equal(got[False], got[True])


def test_the_caller_sees_no_padding_in_what_generate_returns():
    """Hidden states, scores and the returned cache have the shapes and values of the branch-apart run,
    whose main rows are never padded."""
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    extra = dict(GEN, return_dict_in_generate=True, output_hidden_states=True, output_scores=True)
    outs = {}
    with torch.no_grad():
        for separate in (False, True):
            cfg = hg.get_config("icd", prefix_ids=PREFIX, separate_stream=separate)
            with hg.wrap(model, methods=cfg):
                outs[separate] = model.generate(**inputs, **extra)
    rows, apart = outs[False], outs[True]
    assert torch.equal(rows.sequences, apart.sequences)
    for mine, theirs in zip(rows.hidden_states, apart.hidden_states):
        assert [h.shape for h in mine] == [h.shape for h in theirs]
        torch.testing.assert_close(mine[-1], theirs[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(rows.scores), torch.stack(apart.scores), atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(rows.past_key_values.layers, apart.past_key_values.layers):
        assert mine.keys.shape == theirs.keys.shape
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
