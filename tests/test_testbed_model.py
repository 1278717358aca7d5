"""The shipped test model: loads offline, has its processor, and behaves as its report says."""

import json

import pytest
import torch

import halluguard as hg
from halluguard import testbed
from halluguard.testbed import evaluate, world
from halluguard.testbed.model import IMAGE_TOKENS, PROMPT_TEMPLATE


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
    out = model.generate(**enc, max_new_tokens=30, do_sample=False)
    caption = processor.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert caption.endswith(".") and any(c in caption for c in world.CATEGORIES)


def test_measured_behaviour_holds_on_fresh_held_out_scenes(shipped):
    """On 100 fresh scenes per split (margins for the smaller sample): the model names most objects,
    answers POPE well, and hallucinates clearly more where its training prior misleads it. The
    report's 500-scene numbers are checked too."""
    model, processor = shipped
    metrics = evaluate.evaluate(model, processor, count=100, pope_images=50)
    assert metrics["test"]["recall"] >= 75
    assert metrics["pope_random"]["accuracy"] >= 75
    assert metrics["misleading"]["chair_i"] >= 15  # the prior misleads
    assert metrics["misleading"]["chair_s"] > 2 * metrics["test"]["chair_s"]
    report = json.loads((testbed.path() / "report.json").read_text())["final"]
    assert report["test"]["recall"] >= 80 and report["pope_random"]["accuracy"] >= 80
    assert report["misleading"]["chair_i"] >= 10
    assert report["misleading"]["chair_i"] > 2 * report["test"]["chair_i"]


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
