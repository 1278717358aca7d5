"""The shipped test model: loads offline, has its processor, and behaves as its report says."""

import itertools
import json

import pytest
import torch

import halluguard as hg
from halluguard import testbed
from halluguard.testbed import evaluate, world
from halluguard.testbed.model import IMAGE_TOKENS, PROMPT_TEMPLATE

# margins below the measured 300-scene numbers (model/REPORT.md: recall 92.8, POPE random 85.9,
# misleading CHAIR_i 11.2, faint partner named 73%), for 100 fresh scenes
TEST_RECALL_MIN = 85
POPE_RANDOM_MIN = 70
MISLEADING_CHAIR_I_MIN = 4
FAINT_PARTNER_RANGE = (50, 100)


@pytest.fixture(scope="module")
def shipped():
    return testbed.load()


def test_loads_offline_from_the_package(shipped, monkeypatch):
    model, _ = shipped
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    files = {p.name for p in testbed.path().iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "REPORT.md", "report.json"} <= files
    size = sum(p.stat().st_size for p in testbed.path().glob("*.safetensors"))
    assert size <= 30 * 2**20
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again, _ = testbed.load()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_processor_expands_the_image_and_applies_the_chat_template(shipped):
    model, processor = shipped
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == PROMPT_TEMPLATE.format(text="Describe the image.")
    enc = processor(images=world.sample_scene("test", 0).render(), text=prompt, return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == IMAGE_TOKENS
    out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    caption = processor.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert caption.endswith(".") and any(c in caption for c in world.CATEGORIES)


def test_measured_behaviour_holds_on_fresh_held_out_scenes(shipped):
    """On 100 fresh scenes per split (margins for the smaller sample): the model names most objects,
    answers POPE well, names an absent partner where its prior misleads it, and finds most faint
    partners. The report's numbers are checked against the floors too."""
    model, processor = shipped
    metrics = evaluate.evaluate(model, processor, count=100, pope_images=50, seed=1)
    assert metrics["test"]["recall"] >= TEST_RECALL_MIN
    assert metrics["pope_random"]["accuracy"] >= POPE_RANDOM_MIN
    assert metrics["misleading"]["chair_i"] >= MISLEADING_CHAIR_I_MIN  # the prior misleads
    assert metrics["misleading"]["chair_i"] > 2 * metrics["test"]["chair_i"]
    assert FAINT_PARTNER_RANGE[0] <= metrics["faint"]["partner_named"] <= FAINT_PARTNER_RANGE[1]
    report = json.loads((testbed.path() / "report.json").read_text())
    final = report["final"]
    # the floors, on the report's 300 scenes per split
    assert final["test"]["recall"] >= 80
    assert final["pope_random"]["accuracy"] >= 80
    assert final["misleading"]["chair_i"] >= 10
    assert report["train_minutes"] <= 45 and report["train_cpu_minutes"] <= 45 * 2  # 45 minutes of 2 cores
    assert report["parameters"] < 10e6


def test_the_report_records_every_training_phase(shipped):
    report = json.loads((testbed.path() / "report.json").read_text())
    phases = report["phases"]
    assert [p["phase"] for p in phases[:3]] == ["vision", "text", "joint"]
    assert all(p["phase"] == "joint" for p in phases[3:])
    for before, after in itertools.pairwise(phases):
        assert after["first_step"] == before["first_step"] + before["steps"]
    assert phases[-1]["first_step"] + phases[-1]["steps"] == report["steps"]
    assert abs(sum(p["cpu_minutes"] for p in phases) - report["train_cpu_minutes"]) < 0.5
    assert all(p["questions_per_example"] >= 1 for p in phases if p["phase"] == "joint")


def test_guarding_the_shipped_model_is_exact(shipped):
    model, processor = shipped
    scenes = list(world.scenes("misleading", 4))
    texts = [PROMPT_TEMPLATE.format(text="Describe the image.")] * 4
    enc = processor(images=[s.render() for s in scenes], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
        want = model.generate(**enc, max_new_tokens=20, do_sample=False)
        with hg.wrap(model, processor, hg.PAIConfig.neutral()):
            assert torch.equal(model.generate(**enc, max_new_tokens=20, do_sample=False), want)
        with hg.wrap(model, processor, hg.PAIConfig(alpha=0.5)):
            model.generate(**enc, max_new_tokens=20, do_sample=False)
        assert torch.equal(model(**enc).logits, before)
