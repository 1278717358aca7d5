"""Measure a model on the synthetic world: caption object recall, CHAIR and POPE accuracy.

Captions are scored with ``halluguard.eval.chair`` against each scene's ground-truth categories and
the world's synonym table; POPE answers with ``halluguard.eval.pope`` (the POPE answer rule). On the
``misleading`` and ``faint`` splits it also reports how often the anchor's partner is named: where it
is absent (a hallucination) and where it is drawn faint (recall of weak evidence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

import numpy as np
import torch

from ..eval.chair import Chair
from ..eval.pope import SPLITS as POPE_SPLITS
from ..eval.pope import metrics as pope_metrics
from ..eval.pope import parse_answer
from . import world
from .model import PROMPT_TEMPLATE

CAPTION_PROMPT = "Describe the image."


@torch.no_grad()
def generate_texts(
    model, processor, images, prompts: list[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy answers, batched with left padding."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [PROMPT_TEMPLATE.format(text=p) for p in prompts[i : i + batch_size]]
        enc = processor(images=images[i : i + batch_size], text=texts, return_tensors="pt", padding=True)
        enc = enc.to(model.device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def caption_scores(scenes: Iterable[world.Scene], captions: list[str], world_module: ModuleType = world) -> dict:
    """CHAIR_s, CHAIR_i, recall and more (percent) of ``captions`` against the scenes' objects."""
    scenes = list(scenes)
    chair = Chair(synonyms=world_module.synonyms_text(), gt={s.image_id: set(s.categories) for s in scenes})
    result = chair.score([{"image_id": s.image_id, "caption": c} for s, c in zip(scenes, captions)])
    result.pop("captions")
    return result


def partner_named(scenes: Iterable[world.Scene], captions: list[str], world_module: ModuleType = world) -> float:
    """Percent of captions that name the partner of the scene's anchor (scenes with one anchor)."""
    synonyms = {s: c for c, syns in world_module.SYNONYMS.items() for s in syns}
    named = []
    for scene, caption in zip(scenes, captions):
        anchor = next(a for a in world_module.PAIRS if a in scene.categories)
        words = {synonyms.get(w.strip(".,")) for w in caption.lower().split()}
        named.append(world_module.PAIRS[anchor] in words)
    return 100.0 * float(np.mean(named)) if named else 0.0


def partner_extras(split: str, scenes: list, captions: list[str]) -> dict:
    """``partner_named`` on the splits built around one anchor (``misleading``, ``faint``)."""
    return {} if split == "test" else {"partner_named": partner_named(scenes, captions)}


def evaluate(
    model,
    processor,
    count: int = 200,
    pope_images: int = 100,
    seed: int = 0,
    max_new_tokens: int = 64,
    world_module: ModuleType = world,
    splits: tuple[str, ...] = ("test", "misleading", "faint"),
    split_extras: Callable[[str, list, list[str]], dict] | None = partner_extras,
) -> dict:
    """Recall/CHAIR on the caption ``splits`` (held-out ``test`` scenes, ``misleading`` scenes, ...) and
    POPE accuracy (random, popular, adversarial) on held-out scenes of ``world_module``;
    ``split_extras(split, scenes, captions)`` adds a world's own measures to a split's results."""
    model.eval()
    results: dict = {}
    for split in splits:
        scene_list = list(world_module.scenes(split, count, seed))
        captions = generate_texts(
            model, processor, [s.render() for s in scene_list], [CAPTION_PROMPT] * len(scene_list), max_new_tokens
        )
        results[split] = caption_scores(scene_list, captions, world_module)
        if split_extras is not None:
            results[split].update(split_extras(split, scene_list, captions))
        results[split]["examples"] = [
            {"image_id": s.image_id, "truth": s.caption, "caption": c} for s, c in list(zip(scene_list, captions))[:5]
        ]
    scene_list = list(world_module.scenes("test", pope_images, seed, start=count))
    popularity, cooc = world_module.category_frequencies(seed=seed), world_module.cooccurrence(seed=seed)
    for kind in POPE_SPLITS:
        rng = np.random.default_rng([seed, 11, len(kind)])
        questions, images = [], []
        for scene in scene_list:
            image = scene.render()
            for q in world_module.pope_questions(scene, kind, rng, popularity=popularity, cooc=cooc):
                questions.append(q)
                images.append(image)
        answers = generate_texts(model, processor, images, [q["text"] for q in questions], 3)
        predicted = [parse_answer(a) for a in answers]
        labels = [q["label"] for q in questions]
        results[f"pope_{kind}"] = pope_metrics(predicted, labels)
    return results


def pope_question_file(split: str, num_images: int, seed: int) -> tuple[list[dict], dict]:
    """POPE questions of ``split`` on ``num_images`` held-out scenes of the shipped test model's synthetic
    world, laid out as the official files are, and a loader of each scene's rendered image by file name."""
    import numpy as np

    scenes = list(world.scenes("test", num_images, seed))
    popularity, cooc = world.category_frequencies(seed=seed), world.cooccurrence(seed=seed)
    rng = np.random.default_rng([seed, 17, world.SPLIT_SEEDS["test"], POPE_SPLITS.index(split)])
    questions, loaders = [], {}
    for scene in scenes:
        name = world.file_name(scene)
        loaders[name] = scene.render
        for q in world.pope_questions(scene, split, rng, popularity=popularity, cooc=cooc):
            questions.append({"question_id": len(questions) + 1, "image": name, "text": q["text"], "label": q["label"]})
    return questions, loaders
