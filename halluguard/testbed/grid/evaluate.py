"""Measure a candidate grid-world model: the shipped evaluation (``halluguard.testbed.evaluate``) on
this world, with the ``faint`` split and how often an anchor's partner is named where it is absent
(``misleading``) or drawn faint (``faint``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .. import evaluate as shared
from ..evaluate import CAPTION_PROMPT, generate_texts
from . import world

__all__ = ["CAPTION_PROMPT", "evaluate", "generate_texts", "partner_named"]


def partner_named(scenes: Iterable[world.Scene], captions: list[str]) -> float:
    """Percent of captions that name the partner of the scene's anchor (scenes with one anchor)."""
    scenes = list(scenes)
    synonyms = {s: c for c, syns in world.SYNONYMS.items() for s in syns}
    named = []
    for scene, caption in zip(scenes, captions):
        anchor = next(a for a in world.PAIRS if a in scene.categories)
        words = {synonyms.get(w.strip(".,")) for w in caption.lower().split()}
        named.append(world.PAIRS[anchor] in words)
    return 100.0 * float(np.mean(named)) if named else 0.0


def evaluate(
    model, processor, count: int = 200, pope_images: int = 100, seed: int = 0, max_new_tokens: int = 64
) -> dict:
    """Recall/CHAIR on held-out ``test`` scenes and on the ``misleading`` and ``faint`` splits (with how
    often the anchor's partner is named there), and POPE accuracy (random, popular, adversarial) on
    held-out scenes."""

    def partner(split: str, scenes: list, captions: list[str]) -> dict:
        return {} if split == "test" else {"partner_named": partner_named(scenes, captions)}

    return shared.evaluate(
        model,
        processor,
        count,
        pope_images,
        seed,
        max_new_tokens,
        world_module=world,
        splits=("test", "misleading", "faint"),
        split_extras=partner,
    )
