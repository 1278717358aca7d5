"""Idefics3 and SmolVLM.

Each image (or image tile, with splitting) is wrapped as
``<fake_token_around_image><global-img | row_r_col_c>`` + ``image_seq_len`` copies of
``image_token_id``; every tile is its own span. The text backbone is ``model.model.text_model``
(Llama), reached through ``get_decoder()``. The wrapper tokens are known to the processor only,
so a text-only stream (VHR, PAI's guidance) drops them when ``wrap`` is given the processor, and
keeps them as plain text otherwise.
"""

from typing import Any

from .base import Adapter


class IdeficsAdapter(Adapter):
    family = "idefics"
    model_types = ("idefics3", "smolvlm")
    row_image_inputs = ("pixel_values", "pixel_attention_mask")

    def marker_ids_from_processor(self, processor: Any) -> tuple[int, ...]:
        """``<fake_token_around_image>``, ``<global-img>`` and the ``<row_r_col_c>`` tile tags."""
        tokenizer = getattr(processor, "tokenizer", processor)
        names = [
            getattr(processor, "fake_image_token", "<fake_token_around_image>"),
            getattr(processor, "global_image_tag", "<global-img>"),
        ]
        names += [f"<row_{r}_col_{c}>" for r in range(1, 17) for c in range(1, 17)]
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return tuple(sorted({vocab[n] for n in names if n in vocab}))
