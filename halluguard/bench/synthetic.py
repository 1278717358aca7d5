"""A random-weight LLaVA-1.5-shaped model, scaled down, for timings that mean something beyond the
4M test model: CLIP 6 x 384 on 192 px (patch 16: 144 image tokens), Llama 12 x 768 with 12 heads,
vocabulary 32000 (about 146M parameters). Prompts: BOS, 20 text tokens, the image, 30 text tokens
(195 tokens), left-padded batches of equal length."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from ..models import tiny_llava_config

IMAGE_TOKEN = 31999


def config():
    """The model's configuration (sizes as the module docstring gives them)."""
    text = dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    vision = dict(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        image_size=192,
        patch_size=16,
    )
    return tiny_llava_config(text, vision, IMAGE_TOKEN)


def build(seed: int = 0) -> LlavaForConditionalGeneration:
    """The model with random weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config()).eval()


def inputs(batch: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        before = torch.randint(10, 31000, (20,), generator=gen)
        after = torch.randint(10, 31000, (30,), generator=gen)
        rows.append(torch.cat([torch.tensor([1]), before, torch.full((144,), IMAGE_TOKEN), after]))
    ids = torch.stack(rows)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 192, 192, generator=gen),
    }
