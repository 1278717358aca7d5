"""LLaVA family: LLaVA-1.5, LLaVA-NeXT (AnyRes), LLaVA-OneVision.

The processor expands each image placeholder into one ``image_token_id`` per visual feature
(AnyRes grids and row-newline features included), so the image span of a row is the run of those
ids. The text backbone is ``model.model.language_model`` (Llama, Mistral, Qwen2, ...).
"""

from .base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava", "llava_next", "llava_onevision")
    visual_token_fields = ("image_token_id", "video_token_id")
