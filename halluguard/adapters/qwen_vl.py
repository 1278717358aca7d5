"""Qwen-VL family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL.

Each image becomes ``<|vision_start|>`` + ``t*h*w / merge^2`` copies of ``image_token_id`` +
``<|vision_end|>``; videos use ``video_token_id``. The visual span is the run of image or video
ids (the start/end markers are text). Rotary positions are 3-D (M-RoPE), which does not change key
indices: key ``j`` of the cache is still token ``j`` of the row.
"""

import torch

from .base import Adapter


class QwenVLAdapter(Adapter):
    family = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    visual_token_fields = ("image_token_id", "video_token_id")
    image_marker_fields = ("vision_start_token_id", "vision_end_token_id")
    positions_from_ids = True

    def image_slices(self, inputs: dict) -> list[slice]:
        """``pixel_values`` holds every image's flattened patches in a row: ``t * h * w`` rows per image
        (``image_grid_thw``)."""
        grid = inputs.get("image_grid_thw")
        if not isinstance(grid, torch.Tensor):
            return super().image_slices(inputs)
        ends = grid.prod(-1).cumsum(0).tolist()
        return [slice(start, end) for start, end in zip([0, *ends[:-1]], ends)]
