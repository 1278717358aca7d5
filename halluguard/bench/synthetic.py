"""Random-weight LLaVA-1.5-shaped models for timings that mean something beyond the 4M test model,
built from a configuration where they run (no download):

* ``synthetic-medium`` (about 146M parameters, float32): CLIP 6 x 384 on 192 px (patch 16: 144 image
  tokens), Llama 12 x 768 with 12 heads, vocabulary 32000;
* ``synthetic-7b`` (about 7.06B parameters, bfloat16): LLaVA-1.5-7B's shapes, CLIP ViT-L/14 at 336 px
  (24 x 1024, 16 heads, 576 image tokens) and Llama-2-7B (32 x 4096, 32 heads, MLP 11008, vocabulary
  32064).

Prompts: BOS, 20 text tokens, the image, 30 text tokens (195 tokens for the medium model, 627 for the
7B one), batches of equal length. Methods that need calibration data get timing-only stand-ins
(:func:`stand_ins`): their costs are real, their effects on random weights mean nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from ..models import tiny_llava_config

BEFORE_IMAGE, AFTER_IMAGE = 20, 30  # text tokens around the image
ICD_PREFIX = tuple(range(40, 57))  # the instruction prefix ICD's disturbed branch reads, as token ids


@dataclasses.dataclass(frozen=True)
class Shape:
    """One synthetic model: its text and vision fields, image placeholder id, default dtype and label."""

    text: dict
    vision: dict
    image_token: int
    dtype: torch.dtype
    label: str

    @property
    def image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


SHAPES = {
    "synthetic-medium": Shape(
        text=dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
        vision=dict(
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=6,
            image_size=192,
            patch_size=16,
        ),
        image_token=31999,
        dtype=torch.float32,
        label="random LLaVA-1.5 shape, 146M",
    ),
    "synthetic-7b": Shape(
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        image_token=32000,
        dtype=torch.bfloat16,
        label="random LLaVA-1.5-7B shapes, 7.1B",
    ),
}


def shape(name: str) -> Shape:
    """The shape called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in SHAPES:
        raise ValueError(f"no synthetic model {name!r}; choose from {', '.join(SHAPES)}")
    return SHAPES[name]


def config(name: str = "synthetic-medium"):
    """The model's ``LlavaConfig`` (sizes as the module docstring gives them)."""
    found = shape(name)
    return tiny_llava_config(found.text, found.vision, found.image_token)


def build(name: str = "synthetic-medium", seed: int = 0, device=None, dtype: torch.dtype | None = None):
    """The model with random weights drawn from ``seed``, in eval mode, made directly on ``device``
    (default: where tensors are made by default) in ``dtype`` (default: the shape's), so that the 7B
    one never exists in float32 or on the host when it is built for a GPU."""
    from transformers import AutoModelForImageTextToText

    dtype = dtype or shape(name).dtype
    torch.manual_seed(seed)  # every device's generator
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = AutoModelForImageTextToText.from_config(config(name), dtype=dtype)
    return model.eval()


def inputs(batch: int, seed: int = 0, name: str = "synthetic-medium") -> dict:
    """``batch`` prompts of random text tokens around the image placeholders, and random pixels."""
    found = shape(name)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        before = torch.randint(10, 31000, (BEFORE_IMAGE,), generator=gen)
        after = torch.randint(10, 31000, (AFTER_IMAGE,), generator=gen)
        image = torch.full((found.image_tokens,), found.image_token)
        rows.append(torch.cat([torch.tensor([1]), before, image, after]))
    ids = torch.stack(rows)
    size = found.vision["image_size"]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=gen),
    }


def stand_ins(
    name: str, methods: set[str], directory: str | Path, given: dict[str, dict] | None = None, seed: int = 0
) -> dict[str, dict]:
    """Timing-only fields for the methods in ``methods`` that need a model's calibration data, which a
    random model has none of: VAR's sink dimensions, DeCoRe's retrieval heads (random scores), VTI's
    directions (random, written under ``directory``) and ICD's instruction as token ids; none for a
    field ``given`` (the caller's fields per method) already sets."""
    found = shape(name)
    given = given or {}
    gen = torch.Generator().manual_seed(seed)
    layers, heads = found.text["num_hidden_layers"], found.text["num_attention_heads"]
    fields: dict[str, dict] = {}

    def wanted(method: str, field: str) -> bool:
        return method in methods and field not in given.get(method, {})

    if wanted("var", "sink_dims"):
        fields["var"] = {"sink_dims": [0, 1], "tau": 1.5}
    if wanted("icd", "prefix_ids"):
        fields["icd"] = {"prefix_ids": list(ICD_PREFIX)}
    if wanted("decore", "retrieval_heads"):
        scores = torch.rand(layers, heads, 4, generator=gen).tolist()
        heads_file = {f"{layer}-{head}": scores[layer][head] for layer in range(layers) for head in range(heads)}
        fields["decore"] = {"retrieval_heads": heads_file}
    if wanted("vti", "directions"):
        from ..calibrate.vti import save

        vision = found.vision
        directions = {
            "text": torch.randn(layers, found.text["hidden_size"], generator=gen),
            "vision": torch.randn(
                vision["num_hidden_layers"], found.image_tokens + 1, vision["hidden_size"], generator=gen
            ),
        }
        Path(directory).mkdir(parents=True, exist_ok=True)
        target = Path(directory) / f"{name}-vti.safetensors"
        save(directions, target, {"model": name})
        fields["vti"] = {"directions": str(target)}
    return fields
