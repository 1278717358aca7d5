"""Loading a vision-language model by name and building its chat prompts.

``load_model("testbed")`` loads the shipped test model; any other name is a hub id or a local path
read through transformers' auto classes. ``build_prompt`` / ``chat_prompt`` turn a question (or a
conversation) into the model's prompt text, with llava-1.5's plain form where the processor has no
chat template. torch and transformers are imported inside the functions that need them, so importing
this module is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

DTYPES = ("auto", "fp32", "fp16", "bf16")
# Processors of prefix-LM models whose prompt is one image token per image and then the bare text; the
# processor expands the image tokens and puts BOS after them (PaliGemma 1 and 2: no chat template).
BARE_PROMPT_PROCESSORS = ("PaliGemmaProcessor",)


class ModelError(Exception):
    """A model that cannot be loaded as named; the message says why."""


def looks_like_path(spec: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)


def check_device(device: str) -> None:
    """Refuse a device torch cannot name, or CUDA where there is none."""
    import torch

    try:
        target = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"unknown device {device!r} ({err})") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")


def default_device() -> str | None:
    """Where a model goes when no device is named: this process's GPU (under a launcher, its own)
    when there is one, else None (where it was made)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return str(PartialState().device)


def dtype_of(name: str):
    """The torch dtype a ``DTYPES`` name stands for; None for ``"auto"`` (the model's own)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(name)


def _load_pretrained(spec: str, torch_dtype):
    """``(model, processor)`` from a hub id or a local path, the processor padding on the left."""
    if looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise ModelError(f"model path {spec} does not exist")
    from transformers import AutoModelForImageTextToText

    from . import compat

    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=torch_dtype or "auto")
    processor = compat.load_processor(spec)
    processor.tokenizer.padding_side = "left"
    return model, processor


def load_model(spec: str, dtype: str = "auto", device: str | None = None):
    """``(model, processor, name)`` for ``"testbed"`` (the shipped model) or a hub id / local path, in
    eval mode on ``device`` (default: under a launcher with CUDA, this process's GPU; else where it
    loaded); ``halluguard.eval.runner.model_info(model, name)`` gives its identity.

    Raises ``ValueError`` for an unknown dtype or device and :class:`ModelError` for a missing path."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if device:
        check_device(device)
    torch_dtype = dtype_of(dtype)
    if spec == "testbed":
        from .testbed import load

        model, processor = load(dtype=torch_dtype or torch.float32)
    else:
        model, processor = _load_pretrained(spec, torch_dtype)
    device = device or default_device()
    if device:
        model.to(device)
    return model.eval(), processor, spec


def build_prompt(processor, text: str, system: str = "") -> str:
    """The model's chat prompt with one image and ``text`` (llava-style fallback without a template),
    after a system turn holding ``system`` when it is not empty."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return chat_prompt(processor, messages)


def chat_prompt(processor, messages: list[dict]) -> str:
    """The model's chat prompt for ``messages`` (transformers' chat format: each content a list of
    ``{"type": "image"}`` and ``{"type": "text", "text": ...}`` parts), ready for the answer.

    For a processor in ``BARE_PROMPT_PROCESSORS``: one image token per image, then the texts joined
    by spaces (the processor expands the image tokens and puts BOS after them). Otherwise, without a
    chat template: llava-1.5's plain form, ``"USER: <image>\\n{text} ASSISTANT:"`` per user turn (one
    image token per image), an assistant turn's text after ``ASSISTANT:``, a system turn's text
    first."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if any(cls.__name__ in BARE_PROMPT_PROCESSORS for cls in type(processor).__mro__):
        images = sum(p["type"] == "image" for message in messages for p in _parts(message))
        return image_token * images + " ".join(_texts(message) for message in messages)
    pieces = [_plain_turn(message, image_token) for message in messages]
    return " ".join([*pieces, "ASSISTANT:"])


def _parts(message: dict) -> list[dict]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _texts(message: dict) -> str:
    return " ".join(p["text"] for p in _parts(message) if p["type"] == "text")


def _plain_turn(message: dict, image_token: str) -> str:
    """One turn of llava-1.5's plain prompt form (see :func:`chat_prompt`)."""
    text = _texts(message)
    images = sum(p["type"] == "image" for p in _parts(message))
    if message["role"] == "system":
        return text
    if message["role"] == "user":
        return "USER: " + f"{image_token}\n" * images + text
    return f"ASSISTANT: {text}"


def encode(processor, prompts: list[str], images: list) -> dict:
    """The processor's model inputs for a batch: ``prompts[i]`` with ``images[i]`` (one image, a list
    of them, or ``None``/``[]`` for none), padded as the tokenizer pads (``load_model``: on the left).

    Images go in one list per prompt, which every family's processor reads (Gemma 3's, Idefics3's and
    SmolVLM's need it: a flat list would be taken as all images of the first prompt). ``labels``,
    which PaliGemma's processor adds for training, is dropped."""
    nested = [list(i) if isinstance(i, (list, tuple)) else ([] if i is None else [i]) for i in images]
    if len(nested) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(nested)} image lists")
    inputs = processor(images=nested if any(nested) else None, text=prompts, return_tensors="pt", padding=True)
    inputs.pop("labels", None)
    return inputs


def tiny_llava_config(text_config: dict, vision_config: dict, image_token: int, **fields):
    """A small ``LlavaConfig`` built from scratch: a Llama text model with the fields ``text_config``
    and a CLIP vision tower with the fields ``vision_config`` (its projection as wide as its hidden
    size unless they say otherwise); ``image_token`` is the image placeholder, one per patch (the CLS
    token dropped: the ``"default"`` feature strategy). ``fields`` sets further ``LlavaConfig`` fields.
    The test model, the tests' tiny LLaVA and the benchmark's synthetic model are built with it."""
    from transformers import LlavaConfig

    vision = {"model_type": "clip_vision_model", "projection_dim": vision_config["hidden_size"], **vision_config}
    return LlavaConfig(
        text_config={"model_type": "llama", **text_config},
        vision_config=vision,
        image_token_index=image_token,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="default",
        **fields,
    )
