"""Idefics3 and SmolVLM.

Each image (or image tile, with splitting) is wrapped as
``<fake_token_around_image><global-img | row_r_col_c>`` + ``image_seq_len`` copies of
``image_token_id``; every tile is its own span. The text backbone is ``model.model.text_model``
(Llama), reached through ``get_decoder()``.
"""

from .base import Adapter


class IdeficsAdapter(Adapter):
    family = "idefics"
    model_types = ("idefics3", "smolvlm")
    row_image_inputs = ("pixel_values", "pixel_attention_mask")
