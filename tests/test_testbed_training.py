"""The test model's training code: architecture, batches, the image-dropped rows and the cell head."""

import itertools

import numpy as np
import pytest
import torch

from halluguard.adapters import adapter_for
from halluguard.decoding.layout import text_only_rows
from halluguard.testbed import model as testbed_model
from halluguard.testbed import train, world


def test_architecture_has_the_heads_and_layers_head_methods_need():
    config = testbed_model.build_config()
    text = config.text_config
    assert text.num_hidden_layers >= 6 and text.num_attention_heads >= 8
    assert text.num_key_value_heads < text.num_attention_heads and text.attention_dropout > 0
    cells_per_side = world.IMAGE_SIZE // testbed_model.PATCH_SIZE // world.GRID
    assert cells_per_side * testbed_model.PATCH_SIZE * world.GRID == world.IMAGE_SIZE  # a cell is whole patches
    assert set(w for p in world.POSITIONS for w in p.split()) <= set(testbed_model.vocabulary())


def test_image_dropped_caption_rows_are_the_prompt_the_image_free_stream_builds():
    """A caption trained without its image has exactly the ids of the image row with the image tokens
    removed, as the adapters build the image-free prompt (PAI's guidance, VHR's probe)."""
    processor = testbed_model.build_processor()
    processor.tokenizer.padding_side = "right"
    popularity, cooc = world.category_frequencies(300), world.cooccurrence(300)
    scenes = list(world.scenes("train", 4))
    with_image, imaged = train.make_batch(processor, scenes, np.random.default_rng(0), popularity, cooc, 1.0, 0.0)
    without, none = train.make_batch(processor, scenes, np.random.default_rng(0), popularity, cooc, 1.0, 1.0)
    assert len(imaged) == 4 and none == []
    model = testbed_model.build_model()
    adapter = adapter_for(model, processor)
    for row in range(4):
        keep = with_image["input_ids"][row] != model.config.image_token_id
        want = with_image["input_ids"][row][keep & (with_image["attention_mask"][row] == 1)]
        got = without["input_ids"][row][without["attention_mask"][row] == 1]
        assert torch.equal(got, want)
        labels = without["labels"][row][without["labels"][row] != -100]
        assert processor.tokenizer.decode(labels, skip_special_tokens=True).rstrip(".") in scenes[row].caption
    first = {k: v[:1] for k, v in with_image.items() if k != "labels"}
    text_only = text_only_rows(first, adapter.image_and_marker_mask(first["input_ids"]))
    assert int((text_only["input_ids"] == model.config.image_token_id).sum()) == 0


def test_cell_head_targets_every_clearly_drawn_object_and_leaves_faint_ones_out():
    model = testbed_model.build_model()
    head = train.CellHead(model)
    processor = testbed_model.build_processor()
    scenes = list(world.scenes("faint", 3))
    pixels = processor.image_processor([s.render() for s in scenes], return_tensors="pt")["pixel_values"]
    model.model.vision_tower(pixels)
    loss = head.loss(scenes)
    assert torch.isfinite(loss) and loss.item() > 0
    assert head.features.shape[1] == (world.IMAGE_SIZE // testbed_model.PATCH_SIZE) ** 2
    # a faint object's cell carries no target: its features cannot change the loss
    with torch.no_grad():
        per = head.side // world.GRID
        row, obj = next((r, o) for r, s in enumerate(scenes) for o in s.objects if o.faint)
        r, c = divmod(obj.cell, world.GRID)
        poked = head.features.clone().reshape(len(scenes), world.GRID, per, world.GRID, per, -1)
        poked[row, r, :, c] += 5.0
        head.features = poked.reshape(head.features.shape)
        assert head.loss(scenes).item() == pytest.approx(loss.item(), abs=1e-6)
        clear = next(o for o in scenes[row].objects if not o.faint)
        r, c = divmod(clear.cell, world.GRID)
        poked[row, r, :, c] += 5.0
        head.features = poked.reshape(head.features.shape)
        assert head.loss(scenes).item() != pytest.approx(loss.item(), abs=1e-3)


def test_lookalike_questions_ask_about_absent_shapes_close_to_a_drawn_one():
    similarity = world.shape_similarity()
    assert similarity["pentagon"]["hexagon"] > 0.8 > similarity["moon"]["hexagon"]
    assert all(similarity[c][c] == 1.0 for c in world.CATEGORIES)
    rng = np.random.default_rng(0)
    negatives = 0
    for scene in world.scenes("train", 200):
        q = train.lookalike_question(scene, rng, similarity)
        present = scene.categories
        assert (q["category"] in present) == (q["label"] == "yes")
        if q["label"] == "no":
            negatives += 1
            absent = [c for c in world.CATEGORIES if c not in present]
            closeness = {c: max(similarity[p][c] for p in present) for c in absent}
            rank = sorted(closeness.values(), reverse=True)
            assert closeness[q["category"]] >= rank[train.LOOKALIKE_TOP - 1]
    assert 70 < negatives < 130


def test_question_examples_ask_several_questions_one_per_turn_and_label_only_the_answers():
    """A question example is a conversation of distinct yes/no questions; the labels are each answer
    and its end token, in order, and nothing of the prompts; the first turn is the eval's prompt."""
    processor = testbed_model.build_processor()
    processor.tokenizer.padding_side = "right"
    popularity, cooc = world.category_frequencies(300), world.cooccurrence(300)
    scenes = list(world.scenes("train", 6))
    rng = np.random.default_rng(0)
    batch, imaged = train.make_batch(processor, scenes, rng, popularity, cooc, 0.0, 0.0, questions=3)
    assert len(imaged) == 6
    tok = processor.tokenizer
    replay = np.random.default_rng(0)
    for row, scene in enumerate(scenes):
        turns, is_caption = train.make_example(scene, replay, popularity, cooc, 0.0, None, 3)
        assert not is_caption and len(turns) == 3
        assert len({prompt.split(" in the image")[0] for prompt, _ in turns}) == 3  # distinct categories
        for prompt, answer in turns:
            category = prompt.split("Is there a ")[1].split(" in the image?")[0]
            assert answer == ("yes" if category in scene.categories else "no")
        labels = batch["labels"][row][batch["labels"][row] != -100]
        assert tok.convert_ids_to_tokens(labels.tolist()) == [t for _, a in turns for t in (a, "</s>")]
        text = tok.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
        assert text.count("assistant :") == 3
        first = train.conversation(turns[:1], True)
        assert first.startswith(testbed_model.PROMPT_TEMPLATE.format(text=turns[0][0]))
    one, _ = train.make_batch(processor, scenes, np.random.default_rng(0), popularity, cooc, 0.0, 0.0, questions=1)
    assert int((one["labels"] != -100).sum()) == 2 * 6


def test_learning_rate_warms_up_then_decays_to_its_floor():
    peak, steps, warmup = 3e-4, 100, 10
    assert train.lr_at(0, steps, peak, warmup) == pytest.approx(peak / warmup)
    assert train.lr_at(warmup, steps, peak, warmup) == pytest.approx(peak)
    assert train.lr_at(steps, steps, peak, warmup) == pytest.approx(train.LR_FLOOR * peak)
    assert train.lr_at(steps, steps, peak, warmup, floor=0.5) == pytest.approx(0.5 * peak)
    rates = [train.lr_at(s, steps, peak, warmup, floor=0.5) for s in range(warmup, steps + 1)]
    assert all(a >= b for a, b in itertools.pairwise(rates))
    constant = [train.lr_at(s, steps, peak, warmup, floor=1.0) for s in range(warmup, steps + 1)]
    assert constant == pytest.approx([peak] * len(constant))
