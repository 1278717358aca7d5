"""Lookback Lens calibration with CHAIR labels, and the test model's shipped classifier.

* object mentions are found where CHAIR finds them (synonyms, plurals, two-word objects) and mapped
  to the tokens that spell them; window and mention examples get the labels the rules give;
* a calibration on the test model's world trains a classifier that loads and fits the model;
* the shipped classifier separates hallucinated from faithful mentions on fresh misleading scenes
  (AUROC measured about 0.9; asserted above 0.75).
"""

import torch

import halluguard as hg
from halluguard import testbed
from halluguard.calibrate.lookback import Examples, auroc, calibrate, caption_examples, mention_spans, token_spans
from halluguard.eval.chair import Chair
from halluguard.methods.lookback.classifier import LookbackClassifier
from halluguard.models import build_prompt
from halluguard.testbed import world


def test_mentions_are_chair_mentions_with_their_characters():
    chair = Chair()  # COCO: synonyms and two-word objects
    caption = "Two dogs chase a hot dog near the Motorbikes."
    spans = mention_spans(chair, caption)
    assert [(caption[a:b].lower(), node) for a, b, node in spans] == [
        ("dogs", "dog"),
        ("hot dog", "hot dog"),
        ("motorbikes", "motorcycle"),
    ]
    _, nodes, _ = chair.caption_to_words(caption)
    assert [node for *_, node in spans] == nodes


def test_examples_take_their_labels_from_the_mentions():
    features = torch.arange(10.0)[:, None, None].expand(10, 2, 3)
    ranges = [(i * 2, i * 2 + 2) for i in range(10)]  # token t spells characters [2t, 2t + 2)
    mentions = [(4, 6, "cat"), (10, 13, "dog")]  # tokens 2 (cat) and 5-6 (dog)
    by_mention, by_window = Examples(), Examples()
    caption_examples(features, ranges, mentions, {"cat"}, 4, 7, by_mention, by_window)
    assert by_mention.labels == [1, 0]
    torch.testing.assert_close(by_mention.features[1], torch.full((6,), 5.5))
    # windows of 4 tokens ending at tokens 3..9; hallucinated when they hold token 5 or 6
    assert by_window.labels == [1, 1, 0, 0, 0, 0, 0]
    assert by_window.images == [7] * 7


def test_calibration_on_the_test_model_trains_a_classifier_that_fits_it(tmp_path):
    model, processor = testbed.load()
    scenes = list(world.scenes("misleading", 24, 0, start=90_000)) + list(world.scenes("test", 24, 0, start=90_000))
    truth = {s.image_id: set(s.categories) for s in scenes}
    chair = Chair(synonyms=world.synonyms_text(), gt=truth)
    prompt = build_prompt(processor, "Please describe this image in detail.")
    classifier, report = calibrate(
        model, processor, [s.render() for s in scenes], [s.image_id for s in scenes], truth, chair, prompt,
        batch_size=16, name="testbed", progress=lambda **kw: _Quiet(),
    )  # fmt: skip
    assert report["captions"] == 48 and report["mentions"] > 100 and report["hallucinated"] > 0
    assert report["train_examples"] > 0 and report["held_out_windows"] > 0
    # refit on every window after the held-out check, as the official script refits on all its data
    assert report["final_examples"] == report["train_examples"] + report["held_out_windows"]
    assert classifier.metrics["auroc_window"] == report["auroc_window"]
    classifier.save(tmp_path / "lb.json")
    with hg.wrap(model, processor, hg.get_config("lookback", classifier=str(tmp_path / "lb.json"))):
        pass  # the layout check passes


def test_the_shipped_classifier_separates_hallucinated_mentions():
    model, processor = testbed.load()
    classifier = LookbackClassifier.load(testbed.path() / "lookback.json")
    classifier.check(6, 8, "prompt")
    scenes = list(world.scenes("misleading", 96, 0, start=95_000))
    truth = {s.image_id: set(s.categories) for s in scenes}
    chair = Chair(synonyms=world.synonyms_text(), gt=truth)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompt = build_prompt(processor, "Please describe this image in detail.")
    mentions, windows = Examples(), Examples()
    config = hg.get_config("lookback", classifier=str(testbed.path() / "lookback.json"))
    with hg.wrap(model, processor, config) as guard, torch.no_grad():
        for i in range(0, len(scenes), 32):
            batch = scenes[i : i + 32]
            enc = processor(
                images=[s.render() for s in batch], text=[prompt] * len(batch), return_tensors="pt", padding=True
            )
            out = model.generate(**enc, max_new_tokens=64, do_sample=False)
            for scene, ids, detection in zip(
                batch, out[:, enc["input_ids"].shape[1] :].tolist(), guard.results["lookback"]
            ):
                length = next(
                    (k for k, t in enumerate(ids) if t in (tokenizer.eos_token_id, tokenizer.pad_token_id)), len(ids)
                )
                text, ranges = token_spans(tokenizer, ids[:length])
                found = mention_spans(chair, text)
                caption_examples(
                    detection.features[:length],
                    ranges,
                    found,
                    truth[scene.image_id],
                    8,
                    scene.image_id,
                    mentions,
                    windows,
                )
    x, y = mentions.subset({s.image_id for s in scenes})
    assert 0 < int((y == 0).sum()) < len(y)
    assert auroc(classifier.faithful_probability(x), y) > 0.75


class _Quiet:
    def update(self, n):
        pass

    def close(self):
        pass
