"""Compute VTI's directions for a model from demonstrations (``halluguard calibrate vti``).

    halluguard calibrate vti --model testbed --out vti.safetensors        # the test world's scenes
    halluguard calibrate vti --model ID --demos hallucination_vti_demos.jsonl --images train2014/ --out vti.safetensors

A demonstration is an image, a question, a faithful caption (``value``) and the same caption with
hallucinated objects (``h_value``): the official file's format, one JSON object per line with
``image`` (a file name under ``--images``), ``question``, ``value`` and ``h_value``. For the test
model, demonstrations come from its world's training scenes: the scene's caption, and the caption
with an absent object added (an anchor's absent partner where there is one).

1. Text: for each demonstration, the prompt (the question as the chat template asks it, with the
   image) followed by each caption runs once; every decoder layer's output at the last token is kept.
2. Vision (encoders with a fixed number of tokens per image: CLIP, SigLIP): the image runs through
   the vision encoder clean and in ``trials`` copies with ``mask_ratio`` of its patches set to the
   image's per-channel mean, the masked copies' hidden states averaged.
3. Directions as the official code computes them (``halluguard.methods.vti.directions``); saved as
   safetensors (``text``, ``vision``) with the model's name, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..adapters import adapter_for
from ..methods.vti.directions import text_directions, vision_directions
from ..models import chat_prompt, encode
from ..outputs import output_file, write_through_temporary


@dataclasses.dataclass
class Demo:
    """One demonstration: an image (PIL), the question, a faithful and a hallucinated caption."""

    image: Any
    question: str
    faithful: str
    hallucinated: str


def read_demos(path: str, images: str | None, count: int) -> list[Demo]:
    """The first ``count`` demonstrations of a JSONL file in the official format."""
    from PIL import Image

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--demos {path}: no such file")
    if images is None or not Path(images).expanduser().is_dir():
        raise ValueError(f"--images {images}: give the folder that holds the demonstrations' images")
    demos = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if len(demos) == count:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            fields = [record[k] for k in ("image", "question", "value", "h_value")]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{file}:{number}: not a demonstration (image, question, value, h_value): {err}") from None
        picture = Path(images).expanduser() / fields[0]
        if not picture.is_file():
            raise ValueError(f"{file}:{number}: image {picture} not found")
        try:
            image = Image.open(picture).convert("RGB")
        except OSError as err:
            raise ValueError(f"{file}:{number}: image {picture} cannot be read: {err}") from None
        demos.append(Demo(image, *fields[1:]))
    if not demos:
        raise ValueError(f"{file} holds no demonstrations")
    return demos


def world_demos(count: int, seed: int = 0) -> Iterator[Demo]:
    """Demonstrations from the test world's training scenes: the caption, and the caption with one
    absent object added in a free cell (an anchor's absent partner where there is one)."""
    from ..eval.chair import CHAIR_PROMPT
    from ..testbed import world

    rng = np.random.default_rng([seed, 7])
    index = 0
    made = 0
    while made < count:
        scene = world.sample_scene("train", index, seed)
        index += 1
        present = set(scene.categories)
        free = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
        partners = [world.PAIRS[a] for a in world.PAIRS if a in present and world.PAIRS[a] not in present]
        absent = partners or [c for c in world.CATEGORIES if c not in present]
        if not free or not absent:
            continue
        category = absent[int(rng.integers(len(absent)))]
        color = list(world.COLORS)[int(rng.integers(len(world.COLORS)))]
        fake = world.Obj(category, color, "small", free[int(rng.integers(len(free)))], (0.0, 0.0), 0.0)
        hallucinated = scene.replace_objects([*scene.objects, fake]).caption
        made += 1
        yield Demo(scene.render(), CHAIR_PROMPT, scene.caption, hallucinated)


@torch.no_grad()
def last_token_states(model, processor, demo: Demo, caption: str) -> torch.Tensor:
    """``(L, d)``: every decoder layer's output (``hidden_states[1:]``) at the caption's last token."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.question}]}]
    inputs = encode(processor, [chat_prompt(processor, messages) + caption], [demo.image])
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    states = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[1:]
    return torch.stack([h[0, -1].float().cpu() for h in states])


def single_crop_pixels(processor, image) -> torch.Tensor | None:
    """The image as the vision encoder takes it, ``(C, H, W)``, when the processor makes one crop of
    a fixed size (None otherwise: tiles, AnyRes grids, flattened patches)."""
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    return pixels[0] if pixels.dim() == 4 and pixels.shape[0] == 1 else None


def masked_copies(pixels: torch.Tensor, patch: int, ratio: float, trials: int, generator: torch.Generator):
    """``trials`` copies of ``pixels`` ``(C, H, W)``, each with ``int(ratio * patches)`` random patches set
    to the image's per-channel mean (the official ``mask_patches``)."""
    height, width = pixels.shape[-2:]
    per_row = width // patch
    patches = (height // patch) * per_row
    mean = pixels.mean(dim=(1, 2), keepdim=True)
    copies = pixels.repeat(trials, 1, 1, 1)
    for copy in copies:
        for index in torch.randperm(patches, generator=generator)[: int(ratio * patches)].tolist():
            row, col = divmod(index, per_row)
            copy[:, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = mean
    return copies


@torch.no_grad()
def encoder_states(tower, pixels: torch.Tensor) -> torch.Tensor:
    """``(L, T, d)``: every vision encoder layer's output, averaged over the images of ``pixels``."""
    states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]
    return torch.stack([h.float().mean(0).cpu() for h in states])


def calibrate(
    model,
    processor,
    demos: list[Demo],
    *,
    mask_ratio: float = 0.99,
    trials: int = 50,
    seed: int = 0,
    vision: bool = True,
    progress: Callable[..., Any] = tqdm,
) -> dict[str, torch.Tensor]:
    """The directions (``text``; ``vision`` where the encoder allows and ``vision`` is asked for)."""
    adapter = adapter_for(model, processor)
    faithful, hallucinated, masked, clean = [], [], [], []
    tower = adapter.vision_tower() if vision else None
    patch = getattr(getattr(tower, "config", None), "patch_size", None)
    device, dtype = model.device, next(tower.parameters()).dtype if tower is not None else None
    for i, demo in enumerate(progress(demos, desc="VTI demonstrations", unit="demo")):
        faithful.append(last_token_states(model, processor, demo, demo.faithful))
        hallucinated.append(last_token_states(model, processor, demo, demo.hallucinated))
        pixels = single_crop_pixels(processor, demo.image) if tower is not None and patch else None
        if pixels is None:
            tower = None
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        copies = masked_copies(pixels, int(patch), mask_ratio, trials, generator)
        masked.append(encoder_states(tower, copies.to(device, dtype)))
        clean.append(encoder_states(tower, pixels[None].to(device, dtype)))
    found = {"text": text_directions(torch.stack(faithful), torch.stack(hallucinated))}
    if tower is not None and masked:
        found["vision"] = vision_directions(torch.stack(masked), torch.stack(clean))
    return found


def save(directions: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Write ``directions`` as safetensors at ``target``, atomically (a temporary file renamed)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in directions.items()}

    def write(temp: Path) -> None:
        save_file(tensors, str(temp), metadata=metadata)
        umask = os.umask(0)  # read by setting it and putting it back
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # an ordinary file's mode: safetensors writes it private (0600)

    write_through_temporary(target, write)


def main(
    model_spec: str,
    out: str,
    *,
    demos: str | None = None,
    images: str | None = None,
    num_demos: int = 70,
    mask_ratio: float = 0.99,
    trials: int = 50,
    seed: int = 0,
    text_only: bool = False,
) -> int:
    """Compute and save the model's directions; returns the exit status."""
    from ..models import load_model

    target = output_file(out)  # checked before the model loads
    if demos is None and model_spec != "testbed":
        raise ValueError(
            "--demos JSONL and --images DIR are needed for a model other than the test model (the official "
            "demonstrations: experiments/data/hallucination_vti_demos.jsonl in shengliu66/VTI, COCO train2014 images)"
        )
    found_demos = read_demos(demos, images, num_demos) if demos is not None else list(world_demos(num_demos, seed))
    model, processor, name = load_model(model_spec)
    directions = calibrate(
        model, processor, found_demos, mask_ratio=mask_ratio, trials=trials, seed=seed, vision=not text_only
    )
    metadata = {
        "model": name,
        "demonstrations": str(len(found_demos)),
        "mask_ratio": str(mask_ratio),
        "trials": str(trials),
        "seed": str(seed),
    }
    save(directions, target, metadata)
    parts = ", ".join(f"{k} {tuple(v.shape)}" for k, v in directions.items())
    print(f"{name}: VTI directions from {len(found_demos)} demonstrations ({parts})")
    if "vision" not in directions and not text_only:
        print("the vision encoder gives no fixed number of tokens per image: text directions only (alpha_image=0)")
    print(f"saved: {target}; use VTIConfig(directions={str(target)!r})")
    return 0
