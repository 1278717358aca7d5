"""Gemma-based LVLMs: Gemma 3 and PaliGemma.

Gemma 3 inserts ``mm_tokens_per_image`` image ids between ``<start_of_image>`` and
``<end_of_image>``, and attends bidirectionally within an image during prefill; some layers use a
sliding window. PaliGemma puts the image tokens first and uses a prefix-LM mask (its attention
modules have ``is_causal=False``). Both masks reach the attention hook through transformers' mask
interface, so the hook needs nothing family-specific.
"""

from .base import Adapter


class GemmaAdapter(Adapter):
    family = "gemma"
    model_types = ("gemma3", "paligemma")
    image_marker_fields = ("boi_token_index", "eoi_token_index")
