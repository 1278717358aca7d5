"""PAI: paying more attention to image (Liu et al., ECCV 2024).

In layers ``[start_layer, end_layer)``, for the last query row of every forward (the last prompt
token at the prefill, the new token at each decode step), the pre-softmax logits on image keys
become ``z + alpha * |z|``: positive logits grow by ``1 + alpha``, negative ones shrink by
``1 - alpha``. Image keys are each row's own image tokens (from ``input_ids``), so batches with
padding and several images are handled per row.

The official code also offers an image-free guidance branch (``--use-cfg``):
``gamma * (s - u) + u`` on log-probabilities under the cutoff ``s >= max(s) + ln(beta)``; its
config fields are here, and ``use_cfg=True`` is refused until that branch is shipped.
"""

from __future__ import annotations

import dataclasses

import torch

from ..adapters import Adapter
from ..attention.edits import AttentionCall, AttentionEdit
from ..config import MethodConfig, param
from ..registry import register_method
from ..state import GuardState
from .base import Method


@dataclasses.dataclass
class PAIConfig(MethodConfig):
    name = "pai"
    neutral_overrides = {"alpha": 0.0}

    alpha: float = param(0.2, "amplification of image-key logits: z + alpha * |z|", low=0.0)
    start_layer: int = param(2, "first layer amplified", low=0)
    end_layer: int | None = param(None, "layer after the last one amplified; None = all layers", low=1, optional=True, kind=int)
    use_cfg: bool = param(False, "add the image-free guidance branch (off by default, as in the official "
                          "argparse; the README runs enable it with gamma 1.1)")
    gamma: float = param(1.1, "guidance strength gamma (README 1.1; CHAIR script 2.0)", low=0.0)
    beta: float = param(0.1, "plausibility cutoff s >= max(s) + ln(beta); 0 disables it", low=0.0, high=1.0)

    def validate(self) -> None:
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(f"PAIConfig.end_layer ({self.end_layer}) must be greater than start_layer ({self.start_layer})")

    def decoding_loop(self) -> str | None:
        return "contrastive branch" if self.use_cfg else None


class PAI(Method):
    """Boost attention logits on image keys for the last query row (see the module docstring)."""

    config_cls = PAIConfig

    def setup(self, adapter: Adapter) -> None:
        cfg = self.config
        if cfg.use_cfg:
            raise ValueError("PAI's image-free guidance branch (use_cfg=True) is not available in this release; "
                             "use PAIConfig(use_cfg=False) for the attention amplification alone")
        self.layers = range(cfg.start_layer, min(cfg.end_layer or adapter.num_layers, adapter.num_layers))
        if not self.layers:
            raise ValueError(f"PAI layers [{cfg.start_layer}, {cfg.end_layer}) select none of the model's "
                             f"{adapter.num_layers} layers")

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if self.config.alpha == 0 or call.layer_idx not in self.layers:
            return None
        image = state.group_masks(call)["image"]
        return AttentionEdit(key_boost=image.to(torch.float32) * self.config.alpha, last_row_only=True)


register_method("pai", PAIConfig, PAI, "pay more attention to image: boost image-key attention logits")
