"""The test model's world (halluguard.testbed.world): determinism, the prior over weak evidence,
only drawn objects named, reading-order captions with positions, annotations and questions."""

import json

import numpy as np
import pytest

from halluguard.testbed import world


def test_scenes_are_deterministic_and_splits_disjoint():
    a = world.sample_scene("train", 5)
    b = world.sample_scene("train", 5)
    assert a == b and np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    ids = {s.image_id for split in world.SPLIT_SEEDS for s in world.scenes(split, 50)}
    assert len(ids) == 50 * len(world.SPLIT_SEEDS)
    assert world.sample_scene("test", 5).objects != world.sample_scene("train", 5).objects
    with pytest.raises(ValueError, match="unknown split"):
        world.sample_scene("val", 0)


def test_world_has_twelve_categories_with_attributes():
    assert len(world.CATEGORIES) >= 12
    objects = [o for s in world.scenes("train", 300) for o in s.objects]
    assert {o.category for o in objects} == set(world.CATEGORIES)
    assert {o.color for o in objects} == set(world.COLORS)
    assert {o.size for o in objects} == set(world.SIZES)
    assert len({o.cell for o in objects}) == world.GRID**2 == world.CELLS
    for scene in world.scenes("train", 300):  # one object per cell
        assert len({o.cell for o in scene.objects}) == len(scene.objects) <= world.MAX_OBJECTS


def _partners_with_anchor(scene):
    """The scene's objects that are partners drawn with their anchor."""
    return [o for o in scene.objects if any(a in scene.categories and p == o.category for a, p in world.PAIRS.items())]


def test_the_training_prior_pairs_anchors_with_partners():
    cooc = world.cooccurrence(3000)
    for anchor, partner in world.PAIRS.items():
        assert cooc[anchor][partner] >= 0.85
    for scene in world.scenes("misleading", 200):
        cats = set(scene.categories)
        anchors = [a for a in world.PAIRS if a in cats]
        assert len(anchors) == 1 and world.PAIRS[anchors[0]] not in cats
        assert 3 <= len(scene.objects) <= 5 and all(o.visibility == 1 for o in scene.objects)
    for scene in world.scenes("faint", 200):
        anchors = [a for a in world.PAIRS if a in scene.categories]
        assert len(anchors) == 1 and 3 <= len(scene.objects) <= 5
        (partner,) = _partners_with_anchor(scene)
        assert partner.category == world.PAIRS[anchors[0]] and partner.faint and partner.size == "small"


def test_partners_sit_next_to_their_anchor_with_graded_visibility():
    levels, near = [], []
    for scene in world.scenes("train", 1200):
        for partner in _partners_with_anchor(scene):
            anchor = next(o for o in scene.objects if world.PAIRS.get(o.category) == partner.category)
            if partner.visibility < 1:  # placed through its anchor (a partner sampled alone is clear)
                near.append(partner.cell in world.neighbours(anchor.cell))
            levels.append(next(k for k, (lo, hi) in world.VISIBILITY.items() if lo <= partner.visibility <= hi))
            if partner.faint:
                assert partner.size == "small"
    shares = {k: levels.count(k) / len(levels) for k in world.VISIBILITY}
    assert len(levels) > 400 and all(abs(shares[k] - 0.3) < 0.05 for k in ("dim", "faint")), shares
    assert shares["clear"] >= 1 / 3
    assert np.mean(near) > 0.97  # next to the anchor unless its neighbours were taken first
    assert all(
        o.visibility == 1 for s in world.scenes("train", 300) for o in s.objects if o not in _partners_with_anchor(s)
    )


def _phrases(caption: str) -> list[str]:
    head, _, last = caption.rstrip(".").rpartition(" and ")
    return (head.split(", ") if head else []) + [last]


def test_captions_name_every_drawn_object_in_reading_order_with_its_position():
    lengths = []
    for scene in world.scenes("train", 300):
        phrases = _phrases(scene.caption)
        assert sorted(phrases) == sorted(o.phrase for o in scene.objects)
        by_phrase = {o.phrase: o for o in scene.objects}
        cells = [by_phrase[p].cell for p in phrases]
        assert cells == sorted(cells)
        assert all(p.endswith(world.POSITIONS[by_phrase[p].cell]) for p in phrases)
        lengths.append(len(scene.caption.replace(",", " ,").replace(".", " .").split()))
    assert 30 <= np.mean(lengths) <= 42 and np.mean([25 <= n <= 48 for n in lengths]) >= 0.75


def test_only_drawn_objects_are_named_annotated_or_asked_about():
    """Every object of a scene (faint ones included) changes its image; captions, annotations and POPE
    'yes' labels come from those objects only."""
    rng = np.random.default_rng(0)
    for scene in list(world.scenes("train", 60)) + list(world.scenes("faint", 20)):
        image = np.asarray(scene.render(), dtype=np.int16)
        for obj in scene.objects:
            without = scene.replace_objects([o for o in scene.objects if o is not obj])
            changed = np.abs(image - np.asarray(without.render(), dtype=np.int16)).max(-1) > 3
            assert changed.sum() > 20, (scene.image_id, obj)
        annotations = world.coco_instances([scene])["annotations"]
        assert len(annotations) == len(scene.objects)
        yes = [q["category"] for q in world.pope_questions(scene, "random", rng) if q["label"] == "yes"]
        assert set(yes) <= set(scene.categories)
        named = {w.strip(".,") for w in scene.caption.split()} & set(world.CATEGORIES)
        assert named == set(scene.categories)


def test_curriculum_caps_keep_anchors_with_their_partners():
    for cap in (1, 2, 3):
        for scene in world.scenes("train", 200, max_objects=cap):
            assert 1 <= len(scene.objects) <= cap


@pytest.mark.parametrize("kind", ["random", "popular", "adversarial"])
def test_pope_questions_are_balanced_and_negatives_are_absent(kind):
    rng = np.random.default_rng(0)
    popularity, cooc = world.category_frequencies(1000), world.cooccurrence(1000)
    for scene in world.scenes("test", 40):
        qs = world.pope_questions(scene, kind, rng, popularity=popularity, cooc=cooc)
        yes = [q["category"] for q in qs if q["label"] == "yes"]
        no = [q["category"] for q in qs if q["label"] == "no"]
        assert len(yes) == len(no) == min(3, len(scene.categories))
        assert set(yes) <= set(scene.categories) and not set(no) & set(scene.categories)
    if kind == "adversarial":
        scene = next(s for s in world.scenes("misleading", 20) if "moon" in s.categories)
        qs = world.pope_questions(scene, kind, rng, cooc=cooc)
        assert "star" in [q["category"] for q in qs if q["label"] == "no"]


def test_export_writes_coco_annotations_readable_by_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    out = world.export("test", 6, tmp_path)
    coco = COCO(str(out / "instances_test.json"))
    scenes = list(world.scenes("test", 6))
    assert sorted(coco.getImgIds()) == sorted(s.image_id for s in scenes)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for scene in scenes:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=scene.image_id))
        assert sorted(names[a["category_id"]] for a in anns) == sorted(o.category for o in scene.objects)
        assert all(coco.annToMask(a).sum() > 20 for a in anns)
    assert (out / "images" / world.file_name(scenes[0])).exists()
    rows = [json.loads(line) for line in (out / "pope_test_adversarial.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} == {"yes", "no"}
    synonyms = (out / "synonyms.txt").read_text().splitlines()
    assert [line.split(", ")[0] for line in synonyms] == list(world.CATEGORIES)


def test_choosing_by_index_draws_what_numpy_draws_from_the_sequence():
    items, weights = ["red", "blue", "green", "yellow", "purple"], [0.1, 0.2, 0.3, 0.25, 0.15]
    ours, theirs = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(300):
        assert world.pick(ours, items) == theirs.choice(items)
        assert world.pick(ours, items, p=weights) == theirs.choice(items, p=weights)
        assert world.pick_distinct(ours, items, 3) == list(theirs.choice(items, size=3, replace=False))
        assert world.shuffled(ours, items) == list(theirs.permutation(items))
    assert ours.random() == theirs.random()  # and leave the generator in the same state


def test_a_ctrl_c_while_scenes_are_drawn_is_not_lost():
    """numpy swallows an interrupt that arrives while it turns a Python list into an array (as
    ``rng.choice(list)`` does); the world chooses by index, so every Ctrl-C stops the drawing."""
    import os
    import signal
    import threading
    import time

    world.sample_scene("misleading", 0)  # imports done: an interrupt during an import is another matter
    # Python's own Ctrl-C handler, also where the tests were started with SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    stopped = 0
    try:
        for trial in range(20):
            timer = threading.Timer(0.002 + 0.003 * (trial % 5), os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                deadline, index = time.monotonic() + 0.3, 0
                while time.monotonic() < deadline:
                    world.sample_scene("misleading", index)
                    index += 1
            except KeyboardInterrupt:
                stopped += 1
            timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped == 20
