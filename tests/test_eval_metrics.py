"""Golden tests of the CHAIR pipeline and the POPE parsing rules and metrics."""

import json

import pytest

from halluguard.eval import chair, pope


@pytest.fixture(scope="module")
def coco():
    return chair.Chair()


@pytest.mark.parametrize(
    "caption, nodes",
    [
        # plurals and irregular plurals
        ("Two dogs and three cats sit on the grass.", ["dog", "cat"]),
        ("People and children watch the mice.", ["person", "person", "mouse"]),
        ("A flock of geese near some knives and buses.", ["bird", "knife", "bus"]),
        ("A pair of skis in the snow.", ["skis"]),
        # a gerund takes its verb lemma, as the tagger-based pipeline does ("skiing" -> ski -> skis)
        ("A man skiing down a slope.", ["person", "skis"]),
        # two-word objects, and "dining table" through its synonym "table"
        (
            "A fire hydrant, a hot dog, a teddy bear and a traffic light.",
            ["fire hydrant", "hot dog", "teddy bear", "traffic light"],
        ),
        ("Wine glasses on a dining table.", ["wine glass", "dining table"]),
        ("A cell phone and a laptop computer.", ["cell phone", "laptop"]),
        # qualifiers: baby/adult animals and passenger vehicles do not fire "person"
        ("A baby elephant next to an adult giraffe.", ["elephant", "giraffe"]),
        ("A passenger train and a passenger jet.", ["train", "airplane"]),
        # blockers: "train track" and "home plate" are no objects
        ("A train track beside the home plate.", []),
        # toilet seat: the seat is part of the toilet, anywhere in the caption
        ("The toilet seat is up.", ["toilet"]),
        ("There is a seat next to the toilet.", ["toilet"]),
        ("A seat in the kitchen.", ["chair"]),
        # repeated mentions all count
        ("A dog, another dog and a third dog.", ["dog", "dog", "dog"]),
        # the data quirks of the reference table: " motor bike" never matches
        ("A motor bike parked outside.", []),
        # no negation handling, as in every reference implementation
        ("There is no cat in the picture.", ["cat"]),
    ],
)
def test_caption_to_node_words(coco, caption, nodes):
    assert coco.caption_to_words(caption)[1] == nodes


def test_scores_match_hand_computation(coco):
    gt = {1: {"dog", "person"}, 2: {"cat"}, 3: {"car", "truck", "person"}}
    records = [
        {"image_id": 1, "caption": "A man walks a dog past a cat."},  # 3 mentions, 1 hallucinated (cat)
        {"image_id": 2, "caption": "A cat sleeps."},  # 1 mention, correct
        {"image_id": 3, "caption": "A car, a car and a bus on the road."},  # 3 mentions, 1 hallucinated (bus)
    ]
    result = coco.score(records, gt=gt)
    assert result["n"] == 3
    assert result["chair_i"] == pytest.approx(100 * 2 / 7)
    assert result["chair_s"] == pytest.approx(100 * 2 / 3)
    assert result["recall"] == pytest.approx(100 * (2 + 1 + 1) / (2 + 1 + 3))
    assert result["precision"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert [c["hallucinated"] for c in result["captions"]] == [["cat"], [], ["bus"]]
    assert result["len"] == pytest.approx((9 + 4 + 12) / 3)  # tokens after the merge, punctuation included


def test_short_regime_drops_the_unfinished_sentence(coco):
    gt = {5: {"dog"}}
    record = {"image_id": 5, "caption": "A dog runs. A cat sits on a"}
    assert coco.score([record], gt=gt)["chair_i"] == pytest.approx(50.0)
    assert coco.score([record], gt=gt, short=True)["chair_i"] == 0.0
    assert chair.drop_incomplete_sentence("No full stop at all") == "No full stop at all"


def test_packaged_coco_ground_truth(coco):
    ids = chair.opera_500_ids()
    assert len(ids) == 500 and len(set(ids)) == 500
    assert all(i in coco.gt for i in ids)
    assert all(set(coco.gt[i]) <= set(coco.node_words) for i in ids[:50])


def test_original_singulariser_option():
    original = chair.Chair(normaliser="singularize")
    assert original.caption_to_words("Two wine glasses and three cats.")[1] == ["wine glass", "cat"]
    assert original.caption_to_words("A man skiing.")[1] == ["person"]  # no lemmatisation of verbs


def test_ground_truth_from_coco_annotation_files(tmp_path):
    instances = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 10, "height": 10},
            {"id": 8, "file_name": "b.jpg", "width": 10, "height": 10},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 18,
                "bbox": [0, 0, 1, 1],
                "area": 1,
                "iscrowd": 0,
                "segmentation": [[0, 0, 1, 0, 1, 1]],
            },
            {
                "id": 2,
                "image_id": 8,
                "category_id": 3,
                "bbox": [0, 0, 1, 1],
                "area": 1,
                "iscrowd": 0,
                "segmentation": [[0, 0, 1, 0, 1, 1]],
            },
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
    }
    captions = {"annotations": [{"id": 1, "image_id": 7, "caption": "A dog on a couch."}]}
    (tmp_path / "instances_val2014.json").write_text(json.dumps(instances))
    (tmp_path / "captions_val2014.json").write_text(json.dumps(captions))
    gt = chair.gt_from_coco_annotations(tmp_path)
    assert gt == {7: {"dog", "couch"}, 8: {"car"}}


def test_cli_prints_scores(tmp_path, capsys):
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"image_id": 9, "caption": "A cat."}]))
    (tmp_path / "instances_x.json").write_text(
        json.dumps(
            {
                "images": [{"id": 9, "file_name": "x.png", "width": 4, "height": 4}],
                "annotations": [],
                "categories": [{"id": 1, "name": "star"}],
            }
        )
    )
    (tmp_path / "syn.txt").write_text("star, stars\ncat\n")
    assert (
        chair.main(["score", str(path), "--coco-annotations", str(tmp_path), "--synonyms", str(tmp_path / "syn.txt")])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["chair_i"] == 100.0 and out["n"] == 1


GOOD = '{"image_id": 9, "caption": "A cat."}'


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no captions"),
        ("\n  \n", "holds no captions"),
        ("[]", "holds no captions"),
        (f'{GOOD}\n\n{{"image_id": 10, "caption": "A dog."\n', "line 3 is not valid JSON"),
        (f'{GOOD}\n{{"image_id": 10}}\n', "line 2 has no 'caption' (keys: image_id)"),
        (f'{GOOD}\n{{"caption": "A dog."}}\n', "line 2 has no 'image_id'"),
        (f"{GOOD}\n[1, 2]\n", "line 2 is not an object"),
        (f'{GOOD}\n{{"image_id": "nine", "caption": "x"}}\n', "line 2: image id 'nine' is not an integer"),
        (f'{GOOD}\n{{"image_id": 10, "caption": null}}\n', "line 2: 'caption' is not a string"),
        (f'{GOOD}\n{{"image_id": 10, "caption": "x"}}\n{GOOD}\n', "line 3 repeats image 9 (line 1)"),
        (f"[{GOOD}, {GOOD}]", "item 2 repeats image 9 (item 1)"),
        (f'{GOOD}\n{{"image_id": 1, "caption": "x"}}\n', "line 2: image 1 has no ground-truth objects"),
    ],
)
def test_score_cli_answers_a_bad_caption_file_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "caps.jsonl"
    path.write_text(content)
    assert chair.main(["score", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert message in captured.err and str(path) in captured.err


def test_score_cli_missing_file(tmp_path, capsys):
    assert chair.main(["score", str(tmp_path / "nope.jsonl")]) == 1
    assert "No such file or directory" in capsys.readouterr().err


def test_score_cli_scores_a_valid_file_with_blank_lines(tmp_path, capsys):
    path = tmp_path / "caps.jsonl"
    path.write_text(f'{GOOD}\n\n{{"image_id": 25, "caption": "A giraffe."}}\n')
    assert chair.main(["score", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["mentions"] == 2


@pytest.mark.parametrize(
    "text, pope_rule, opera_rule",
    [
        ("Yes, there is a dog in the image.", "yes", "yes"),
        ("No, there is no dog.", "no", "no"),
        ("There is not a dog.", "no", "no"),
        ("Yes. But no cat.", "yes", "no"),  # POPE looks at the first sentence only
        ("There isn't a dog.", "yes", "no"),  # only OPERA's rule reads "n't"
        ("NO", "yes", "no"),  # POPE's rule is case-sensitive
        ("I cannot tell", "yes", "yes"),
        ("no", "no", "no"),
    ],
)
def test_answer_rules(text, pope_rule, opera_rule):
    assert pope.parse_answer(text, "pope") == pope_rule
    assert pope.parse_answer(text, "opera") == opera_rule


def test_vcd_rule_is_asymmetric_in_the_label():
    assert pope.parse_answer("I know there is a dog", "vcd", label="no") == "no"  # "know" contains "no"
    assert pope.parse_answer("yes and no", "vcd", label="yes") == "yes"
    assert pope.parse_answer("yes and no", "vcd", label="no") == "no"
    assert pope.parse_answer("Yes", "vcd") == "yes"
    with pytest.raises(ValueError, match="unknown answer rule"):
        pope.parse_answer("yes", "other")


def test_metrics_match_hand_computation():
    predictions = ["yes", "yes", "no", "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    m = pope.metrics(predictions, labels, answers=["Yes", "yes", "No", "Maybe not", "yes!"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)
    assert m["neither_yes_nor_no"] == pytest.approx(20.0)
    with pytest.raises(ValueError):
        pope.metrics(["maybe"], ["yes"])


@pytest.mark.parametrize("dataset", pope.DATASETS)
@pytest.mark.parametrize("split", pope.SPLITS)
def test_official_question_files(dataset, split):
    questions = pope.load_questions(dataset, split)
    assert len(questions) == 3000
    assert sum(q["label"] == "yes" for q in questions) == 1500
    assert len({q["image"] for q in questions}) == 500
    assert all(q["text"].startswith("Is there a") for q in questions)
