"""The synthetic world: determinism, the misleading prior, annotations and questions."""

import json

import numpy as np
import pytest

from halluguard.testbed import world


def test_scenes_are_deterministic_and_splits_disjoint():
    a = world.sample_scene("train", 5)
    b = world.sample_scene("train", 5)
    assert a == b and np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    ids = {s.image_id for split in world.SPLIT_SEEDS for s in world.scenes(split, 50)}
    assert len(ids) == 150
    assert world.sample_scene("test", 5).objects != world.sample_scene("train", 5).objects
    with pytest.raises(ValueError, match="unknown split"):
        world.sample_scene("val", 0)


def test_world_has_twelve_categories_with_attributes():
    assert len(world.CATEGORIES) >= 12
    objects = [o for s in world.scenes("train", 300) for o in s.objects]
    assert {o.category for o in objects} == set(world.CATEGORIES)
    assert {o.color for o in objects} == set(world.COLORS)
    assert {o.size for o in objects} == set(world.SIZES)
    assert len({o.cell for o in objects}) == world.GRID**2


def test_the_training_prior_pairs_anchors_with_partners():
    cooc = world.cooccurrence(3000)
    for anchor, partner in world.PAIRS.items():
        assert cooc[anchor][partner] >= 0.85
    for scene in world.scenes("misleading", 200):
        cats = set(scene.categories)
        anchors = [a for a in world.PAIRS if a in cats]
        assert len(anchors) == 1 and world.PAIRS[anchors[0]] not in cats


def _phrases(caption: str) -> list[str]:
    head, _, last = caption.rstrip(".").rpartition(" and ")
    return (head.split(", ") if head else []) + [last]


def test_captions_follow_reading_order_with_each_partner_right_after_its_anchor():
    moved = 0
    for scene in world.scenes("train", 300):
        phrases = _phrases(scene.caption)
        assert sorted(phrases) == sorted(o.phrase for o in scene.objects)
        by_phrase = {o.phrase: o for o in scene.objects}
        listed = [by_phrase[p] for p in phrases]
        for i, obj in enumerate(listed):
            partner = world.PAIRS.get(obj.category)
            if partner in scene.categories:
                assert listed[i + 1].category == partner
                moved += listed[i + 1].cell < obj.cell
        rest = [o for o in listed if not any(a in scene.categories and p == o.category for a, p in world.PAIRS.items())]
        assert [o.cell for o in rest] == sorted(o.cell for o in rest)
    assert moved > 0  # some partners sit before their anchor in reading order


def test_hidden_partners_are_named_and_annotated_but_not_drawn():
    scene = next(s for s in world.scenes("train", 500) if any(o.hidden for o in s.objects))
    hidden = next(o for o in scene.objects if o.hidden)
    assert hidden.category in world.PAIRS.values() and hidden.phrase in scene.caption
    without = world.Scene(
        scene.image_id, scene.split, [o for o in scene.objects if not o.hidden], scene.background, scene.noise_seed
    )
    assert np.array_equal(np.asarray(scene.render()), np.asarray(without.render()))
    annotations = world.coco_instances([scene])["annotations"]
    assert len(annotations) == len(scene.objects)
    share = np.mean(
        [
            o.hidden
            for s in world.scenes("train", 3000)
            for o in s.objects
            if o.category in world.PAIRS.values()
            and any(a in s.categories for a, p in world.PAIRS.items() if p == o.category)
        ]
    )
    assert abs(share - world.HIDDEN_PARTNER_PROBABILITY) < 0.03


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
