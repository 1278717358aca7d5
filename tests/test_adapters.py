"""Adapters: geometry of the text backbone and image spans per row, for every supported family."""

import pytest
import torch
from tiny_models import FAMILIES, MULTI_IMAGE_FAMILIES, build_model, make_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from halluguard.adapters import adapter_for, mask_to_spans, supported_model_types


@pytest.fixture(scope="module")
def models():
    return {}


def get_model(models, family):
    if family not in models:
        models[family] = build_model(family)
    return models[family]


def test_matrix_covers_the_required_families():
    required = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"}
    assert required <= set(FAMILIES)
    assert set(FAMILIES) <= set(supported_model_types())


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry(models, family):
    model = get_model(models, family)
    adapter = adapter_for(model)
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (3, 4, 2, 16)
    modules = adapter.attention_modules()
    assert len(modules) == 3
    assert [m.layer_idx for m in modules] == [0, 1, 2]
    assert all(m.o_proj.in_features == 4 * 16 for m in modules)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_image_spans_per_row(models, family, padding_side):
    model = get_model(models, family)
    inputs, spans = make_inputs(model, family, batch=3, padding_side=padding_side)
    found = adapter_for(model).image_spans(inputs["input_ids"])
    assert found == spans
    assert all(len(row) == 1 and row[0][1] > row[0][0] for row in found)


@pytest.mark.parametrize("family", MULTI_IMAGE_FAMILIES)
def test_several_images_per_row(models, family):
    model = get_model(models, family)
    inputs, spans = make_inputs(model, family, batch=2, images_per_row=2)
    found = adapter_for(model).image_spans(inputs["input_ids"])
    assert found == spans
    assert all(len(row) == 2 for row in found)


def test_anyres_rows_have_different_image_lengths(models):
    model = get_model(models, "llava_next")
    inputs, _ = make_inputs(model, "llava_next", batch=2)
    lengths = [e - s for ((s, e),) in adapter_for(model).image_spans(inputs["input_ids"])]
    assert lengths[0] != lengths[1]


def test_mask_to_spans_edges():
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert mask_to_spans(mask) == [(0, 2), (3, 4), (6, 7)]
    assert mask_to_spans(torch.zeros(4, dtype=torch.bool)) == []


def test_unsupported_model_lists_the_supported_families():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="unsupported model type 'llama'.*llava.*qwen2_vl"):
        adapter_for(model)
