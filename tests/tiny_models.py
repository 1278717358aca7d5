"""Tiny random-weight vision-language models and hand-built inputs for the tests.

Everything is built from configs (no hub access, no processors, no torchvision):

* ``build_model(family)`` makes a small instance of the real transformers class for a
  ``model_type`` (text: hidden 64, 3 layers, 4 heads, 2 KV heads, vocab 512; vision: hidden 32,
  2 layers, 32-48 px images), fp32, ``eval()``, on CPU.
* ``make_inputs(model, family)`` builds a padded batch by hand: random text around the image
  placeholder tokens (already expanded to the count the model expects) plus every extra tensor
  the family needs, and returns the image-token spans as ground truth.
* ``row_inputs(inputs, i, family)`` cuts one row back out, unpadded, for batch-vs-single checks.

Token ids shared by all families (vocab 512)::

    0 pad   1 bos   2 eos   3..9 unused   10..499 random text   500 image   501..507 other specials

Text tokens are drawn from ``[TEXT_LOW, TEXT_HIGH)`` so they never collide with special ids.
The output-embedding row of ``EOS`` is zeroed, so its logit is exactly 0 and greedy decoding
practically never stops early (the largest of ~500 random logits is positive).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import transformers
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from halluguard.models import tiny_llava_config

PAD, BOS, EOS = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 10, 500
IMAGE = 500
VISION_START, VISION_END, VIDEO = 501, 502, 503  # qwen-vl wrappers / video id
FAKE_AROUND_IMAGE, GLOBAL_IMG = 504, 505  # idefics3 / smolvlm wrappers
BOI, EOI = 506, 507  # gemma3 wrappers
VOCAB = 512

# Shared text backbone (head_dim 16).
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)
_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
_IDEFICS_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=48, patch_size=8
)
# Qwen-VL vision towers: patch 8, 2x2 merge, temporal patch 2 (a 32x48 image is a (1, 4, 6) grid).
_QWEN_VISION = dict(depth=2, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
_QWEN_IDS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END
)
_ANYRES_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

# family -> (model class name, config class name or builder, config kwargs)
_CONFIGS: dict[str, tuple[str, str | Callable, dict]] = {
    "llava": (
        "LlavaForConditionalGeneration",
        tiny_llava_config,
        dict(text_config=dict(_TEXT), vision_config=_CLIP, image_token=IMAGE),
    ),
    "llava_next": (
        "LlavaNextForConditionalGeneration",
        "LlavaNextConfig",
        dict(
            text_config=dict(model_type="llama", **_TEXT),
            vision_config=_CLIP,
            image_token_index=IMAGE,
            image_grid_pinpoints=_ANYRES_PINPOINTS,
            image_seq_length=16,
        ),
    ),
    "llava_onevision": (
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionConfig",
        dict(
            text_config=dict(model_type="qwen2", **_TEXT),
            vision_config=_SIGLIP,
            image_token_index=IMAGE,
            video_token_index=VIDEO,
            image_grid_pinpoints=_ANYRES_PINPOINTS,
        ),
    ),
    "qwen2_vl": (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLConfig",
        dict(
            text_config=dict(
                **_TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
            ),
            vision_config=dict(**_QWEN_VISION, embed_dim=32, hidden_size=64, mlp_ratio=2),
            **_QWEN_IDS,
        ),
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLConfig",
        dict(
            text_config=dict(
                **_TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
            ),
            vision_config=dict(
                **_QWEN_VISION,
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=64,
                window_size=32,
                fullatt_block_indexes=[1],
            ),
            **_QWEN_IDS,
        ),
    ),
    "qwen3_vl": (
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLConfig",
        dict(
            text_config=dict(
                **_TEXT,
                head_dim=16,
                rope_parameters=dict(
                    rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2], mrope_interleaved=True
                ),
            ),
            vision_config=dict(
                **_QWEN_VISION,
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=64,
                num_position_embeddings=16,
                deepstack_visual_indexes=[0],
            ),
            **_QWEN_IDS,
        ),
    ),
    "idefics3": (
        "Idefics3ForConditionalGeneration",
        "Idefics3Config",
        dict(
            text_config=dict(model_type="llama", **_TEXT),
            vision_config=_IDEFICS_VISION,
            image_token_id=IMAGE,
            scale_factor=2,
        ),
    ),
    "smolvlm": (
        "SmolVLMForConditionalGeneration",
        "SmolVLMConfig",
        dict(
            text_config=dict(model_type="llama", **_TEXT),
            vision_config=_IDEFICS_VISION,
            image_token_id=IMAGE,
            scale_factor=2,
        ),
    ),
    "gemma3": (
        "Gemma3ForConditionalGeneration",
        "Gemma3Config",
        dict(
            text_config=dict(
                **_TEXT,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=256,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),
            vision_config=_SIGLIP,
            mm_tokens_per_image=16,
            image_token_index=IMAGE,
            boi_token_index=BOI,
            eoi_token_index=EOI,
        ),
    ),
    "paligemma": (
        "PaliGemmaForConditionalGeneration",
        "PaliGemmaConfig",
        dict(
            text_config=dict(model_type="gemma", **_TEXT, head_dim=16),
            vision_config=_SIGLIP,
            image_token_index=IMAGE,
            vocab_size=VOCAB,
            projection_dim=64,
            hidden_size=64,
        ),
    ),
}

FAMILIES: tuple[str, ...] = tuple(_CONFIGS)
# The families every quick run covers (Llama with CLIP, M-RoPE, sliding-window + bidirectional
# image attention); sweeps over all families mark the others ``slow`` (CI runs those too).
CORE_FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "gemma3")


def family_params(families=FAMILIES, *prefix):
    """``pytest.param``s over families (each after ``prefix`` values), non-core ones marked slow."""
    import pytest

    marks = lambda family: () if family in CORE_FAMILIES else (pytest.mark.slow,)
    return [pytest.param(*prefix, family, marks=marks(family)) for family in families]


# Families whose rows may hold more than one image.
MULTI_IMAGE_FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
)

# Image (height, width) per image; rows cycle through the list (AnyRes and Qwen use real sizes).
_ANYRES_SIZES = [(64, 48), (20, 64), (64, 64)]  # 5, 3 and 5 tiles; 72, 34, 88 tokens
_QWEN_SIZES = [(32, 48), (48, 32), (32, 32)]
_QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def build_model(
    family: str, seed: int = 0, attn_implementation: str = "sdpa", text_overrides: dict | None = None
) -> torch.nn.Module:
    """Tiny random-weight ``family`` model (fp32, eval, CPU); the text decoder uses
    ``attn_implementation``, the vision tower ``sdpa``. Deterministic given ``seed``.
    ``text_overrides`` replaces fields of the text backbone's config (sizes, RoPE, ...)."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    model_cls, config_cls, kwargs = _CONFIGS[family]
    kwargs = copy.deepcopy(kwargs)
    kwargs["text_config"].update(text_overrides or {})
    make_config = getattr(transformers, config_cls) if isinstance(config_cls, str) else config_cls
    config = make_config(**kwargs)
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    model.to(torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS].zero_()  # EOS logit exactly 0 (module docstring)
        if family == "gemma3":  # its projector is zero-initialised, which would hide the image
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD, BOS, EOS
    return model


def image_token_id(model) -> int:
    """The id of the image placeholder token in ``input_ids``."""
    config = model.config
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def make_inputs(
    model,
    family: str,
    batch: int = 2,
    lengths: tuple[int, ...] | None = None,
    padding_side: str = "left",
    images_per_row: int = 1,
    seed: int = 0,
) -> tuple[dict, list[list[tuple[int, int]]]]:
    """Padded batch for ``model(**inputs)`` / ``model.generate(**inputs)`` and its image spans.

    ``lengths[r]`` is the number of random text tokens in row ``r`` (default ``6 + 3 r``), split
    into a short prefix before the first image, one token between images and the rest after.
    Every row starts with BOS (PaliGemma: image tokens, then BOS). ``spans[r]`` lists the
    half-open ``(start, end)`` ranges of image tokens in the padded row, known from construction.
    ``seed`` fixes the text ids and pixel values. Families outside ``MULTI_IMAGE_FAMILIES`` raise
    ``ValueError`` for ``images_per_row > 1``.
    """
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    if images_per_row < 1:
        raise ValueError("images_per_row must be >= 1")
    if images_per_row > 1 and family not in MULTI_IMAGE_FAMILIES:
        raise ValueError(f"{family} inputs support one image per row, got {images_per_row}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = tuple(lengths) if lengths is not None else tuple(6 + 3 * r for r in range(batch))
    if len(lengths) != batch:
        raise ValueError(f"need {batch} lengths, got {len(lengths)}")
    if min(lengths) < images_per_row + 1:
        raise ValueError(f"each row needs at least {images_per_row + 1} text tokens")

    gen = torch.Generator().manual_seed(seed)
    images = [
        [_IMAGE_BUILDERS[family](model, r * images_per_row + j, gen) for j in range(images_per_row)]
        for r in range(batch)
    ]

    # Unpadded rows and their image spans, then padding.
    open_ids, close_ids = _WRAPPERS.get(family, ((), ()))
    rows, row_spans = [], []
    for r in range(batch):
        n_text = lengths[r]
        n_before = max(1, n_text // 4)
        chunks = [n_before] + [1] * (images_per_row - 1)
        chunks.append(n_text - sum(chunks))
        ids, spans = [] if family == "paligemma" else [BOS], []
        for j, img in enumerate(images[r]):
            if family != "paligemma":
                ids += _rand_text(chunks[j], gen)
            ids += open_ids
            spans.append((len(ids), len(ids) + img["n_tokens"]))
            ids += [IMAGE] * img["n_tokens"]
            ids += close_ids
        if family == "paligemma":  # image tokens first, then BOS and the prompt
            ids += [BOS] + _rand_text(n_text, gen)
        else:
            ids += _rand_text(chunks[-1], gen)
        rows.append(ids)
        row_spans.append(spans)

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((batch, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    spans_out = []
    for r, ids in enumerate(rows):
        offset = width - len(ids) if padding_side == "left" else 0
        input_ids[r, offset : offset + len(ids)] = torch.tensor(ids)
        attention_mask[r, offset : offset + len(ids)] = 1
        spans_out.append([(s + offset, e + offset) for s, e in row_spans[r]])

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    is_image = torch.zeros_like(input_ids)
    for r, spans in enumerate(spans_out):
        for s, e in spans:
            is_image[r, s:e] = 1
    inputs.update(_EXTRAS[family](images, is_image))
    return inputs, spans_out


def row_inputs(inputs: dict, i: int, family: str) -> dict:
    """Row ``i`` of a ``make_inputs`` batch as a batch of one, with its padding removed."""
    batch = inputs["input_ids"].shape[0]
    keep = inputs["attention_mask"][i].bool()
    out = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            out[key] = value[i : i + 1, keep]
    if family in _QWEN_FAMILIES:
        grid = inputs["image_grid_thw"]
        k = grid.shape[0] // batch
        patch_counts = grid.prod(-1).tolist()
        start = sum(patch_counts[: i * k])
        stop = start + sum(patch_counts[i * k : (i + 1) * k])
        out["image_grid_thw"] = grid[i * k : (i + 1) * k]
        out["pixel_values"] = inputs["pixel_values"][start:stop]
    elif family in ("idefics3", "smolvlm"):
        out["pixel_values"] = inputs["pixel_values"][i : i + 1]
        out["pixel_attention_mask"] = inputs["pixel_attention_mask"][i : i + 1]
    else:  # one entry per image along dim 0
        k = inputs["pixel_values"].shape[0] // batch
        for key in ("pixel_values", "image_sizes"):
            if key in inputs:
                out[key] = inputs[key][i * k : (i + 1) * k]
        if "image_sizes" in out:  # drop padding tiles beyond this row's largest tile count
            pv = out["pixel_values"]
            used = (pv.flatten(2).abs().sum(-1) > 0).any(0)
            out["pixel_values"] = pv[:, : int(used.nonzero().max()) + 1]
    return out


# ----------------------------------------------------------------------------------------------
# Per-family image builders: return {"n_tokens": int, ...tensors for one image...}.


def _rand_text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen).tolist()


def _square_image(model, index, gen):
    config = model.config
    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    n_tokens = (side // patch) ** 2  # llava ("default" strategy drops CLS), paligemma
    if config.model_type in ("idefics3", "smolvlm"):
        n_tokens //= config.scale_factor**2  # pixel-shuffle connector
    elif config.model_type == "gemma3":
        n_tokens = config.mm_tokens_per_image  # average-pooled to a fixed count
    return {"n_tokens": n_tokens, "pixel_values": torch.randn(3, side, side, generator=gen)}


def _anyres_image(model, index, gen):
    """AnyRes image: base tile + the tiles of the best pinpoint; tokens counted like the model
    does (``get_anyres_image_grid_shape`` + ``unpad_image`` + one newline per feature row)."""
    config = model.config
    tile = config.vision_config.image_size
    per_side = tile // config.vision_config.patch_size
    height, width = _ANYRES_SIZES[index % len(_ANYRES_SIZES)]
    rows, cols = get_anyres_image_grid_shape([height, width], config.image_grid_pinpoints, tile)
    grid = unpad_image(torch.empty(1, rows * per_side, cols * per_side), [height, width])
    feat_h, feat_w = grid.shape[1:]
    n_tokens = per_side * per_side + feat_h * (feat_w + 1)  # base tile (no CLS) + unpadded grid
    pixel_values = torch.randn(1 + rows * cols, 3, tile, tile, generator=gen)
    return {"n_tokens": n_tokens, "pixel_values": pixel_values, "image_size": (height, width)}


def _qwen_image(model, index, gen):
    vision = model.config.vision_config
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    height, width = _QWEN_SIZES[index % len(_QWEN_SIZES)]
    grid = (1, height // p, width // p)
    n_patches = grid[0] * grid[1] * grid[2]
    pixel_values = torch.randn(n_patches, vision.in_channels * t * p * p, generator=gen)
    return {"n_tokens": n_patches // (m * m), "pixel_values": pixel_values, "grid_thw": grid}


_IMAGE_BUILDERS = {
    "llava": _square_image,
    "llava_next": _anyres_image,
    "llava_onevision": _anyres_image,
    "qwen2_vl": _qwen_image,
    "qwen2_5_vl": _qwen_image,
    "qwen3_vl": _qwen_image,
    "idefics3": _square_image,
    "smolvlm": _square_image,
    "gemma3": _square_image,
    "paligemma": _square_image,
}

# Non-image tokens the real processors put right around each image's placeholder run.
_WRAPPERS = {
    "qwen2_vl": ((VISION_START,), (VISION_END,)),
    "qwen2_5_vl": ((VISION_START,), (VISION_END,)),
    "qwen3_vl": ((VISION_START,), (VISION_END,)),
    "idefics3": ((FAKE_AROUND_IMAGE, GLOBAL_IMG), (FAKE_AROUND_IMAGE,)),
    "smolvlm": ((FAKE_AROUND_IMAGE, GLOBAL_IMG), (FAKE_AROUND_IMAGE,)),
    "gemma3": ((BOI,), (EOI,)),
}


# ----------------------------------------------------------------------------------------------
# Per-family extra inputs: images is [row][image] of builder dicts, is_image is (B, T) 0/1.


def _flat(images):
    return [img for row in images for img in row]


def _extras_stacked(images, is_image):
    return {"pixel_values": torch.stack([img["pixel_values"] for img in _flat(images)])}


def _extras_anyres(images, is_image):
    flat = _flat(images)
    max_tiles = max(img["pixel_values"].shape[0] for img in flat)
    pixel_values = torch.zeros(len(flat), max_tiles, *flat[0]["pixel_values"].shape[1:])
    for n, img in enumerate(flat):
        pixel_values[n, : img["pixel_values"].shape[0]] = img["pixel_values"]
    image_sizes = torch.tensor([img["image_size"] for img in flat], dtype=torch.long)
    return {"pixel_values": pixel_values, "image_sizes": image_sizes}


def _extras_qwen(images, is_image):
    flat = _flat(images)
    return {
        "pixel_values": torch.cat([img["pixel_values"] for img in flat]),
        "image_grid_thw": torch.tensor([img["grid_thw"] for img in flat], dtype=torch.long),
        "mm_token_type_ids": is_image.clone(),
    }


def _extras_idefics(images, is_image):
    pixel_values = torch.stack([torch.stack([img["pixel_values"] for img in row]) for row in images])
    mask = torch.ones(pixel_values.shape[:2] + pixel_values.shape[3:], dtype=torch.long)
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask}


def _extras_gemma3(images, is_image):
    return {**_extras_stacked(images, is_image), "token_type_ids": is_image.clone()}


def _extras_paligemma(images, is_image):
    # Inference prompts are all prefix (type 0); generated tokens become suffix (type 1).
    return {**_extras_stacked(images, is_image), "token_type_ids": torch.zeros_like(is_image)}


_EXTRAS = {
    "llava": _extras_stacked,
    "llava_next": _extras_anyres,
    "llava_onevision": _extras_anyres,
    "qwen2_vl": _extras_qwen,
    "qwen2_5_vl": _extras_qwen,
    "qwen3_vl": _extras_qwen,
    "idefics3": _extras_idefics,
    "smolvlm": _extras_idefics,
    "gemma3": _extras_gemma3,
    "paligemma": _extras_paligemma,
}
