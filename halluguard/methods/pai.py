"""PAI: paying more attention to image (Liu et al., ECCV 2024).

In layers ``[start_layer, end_layer)``, for the last query row of every forward (the last prompt
token at the prefill, the new token at each decode step), the pre-softmax logits on image keys
become ``z + alpha * |z|``: positive logits grow by ``1 + alpha``, negative ones shrink by
``1 - alpha``. Image keys are each row's own image tokens (from ``input_ids``), so batches with
padding and several images are handled per row.

With ``use_cfg=True`` (the official ``--use-cfg``), an image-free guidance branch also runs: a
side stream fed the prompt without its image (image tokens and their delimiters removed, no
amplification, its own KV cache) and the same generated tokens; with ``s`` and ``u`` the
log-softmax of the main and image-free next-token scores, the scores become
``gamma * (s - u) + u``, and tokens with ``s < max(s) + ln(beta)`` are cut (``-inf``). This costs
a second forward per generated token. The guidance acts on the scores after the generation
config's own processors (so, in beam search, on its log-probabilities). The image-free stream
runs the plain model: no method acts in it (PAI's amplification is off there, as in the official
code, and so is any composed method such as VHR, so ``u`` is the unguarded model's view).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import LogitsProcessor

from ..adapters import Adapter
from ..attention.edits import AttentionCall, AttentionEdit
from ..config import MethodConfig, param
from ..decoding import SideStream, log_prob_guidance
from ..registry import register_method
from ..state import GuardState
from .base import Method


@dataclasses.dataclass
class PAIConfig(MethodConfig):
    name = "pai"
    neutral_overrides = {"alpha": 0.0, "use_cfg": False}

    alpha: float = param(0.2, "amplification of image-key logits: z + alpha * |z|", low=0.0)
    start_layer: int = param(2, "first layer amplified", low=0)
    end_layer: int | None = param(
        None, "layer after the last one amplified; None = all layers", low=1, optional=True, kind=int
    )
    use_cfg: bool = param(
        False,
        "add the image-free guidance branch (off by default, as in the official "
        "argparse; the README runs enable it with gamma 1.1)",
    )
    gamma: float = param(1.1, "guidance strength gamma (README 1.1; CHAIR script 2.0)", low=0.0)
    beta: float = param(0.1, "plausibility cutoff s >= max(s) + ln(beta); 0 disables it", low=0.0, high=1.0)

    def validate(self) -> None:
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(
                f"PAIConfig.end_layer ({self.end_layer}) must be greater than start_layer ({self.start_layer})"
            )

    def decoding_loop(self) -> str | None:
        return "contrastive branch" if self.use_cfg else None


class PAI(Method):
    """Boost attention logits on image keys for the last query row (see the module docstring)."""

    config_cls = PAIConfig

    def setup(self, adapter: Adapter) -> None:
        cfg = self.config
        self.layers = range(cfg.start_layer, min(cfg.end_layer or adapter.num_layers, adapter.num_layers))
        if not self.layers:
            raise ValueError(
                f"PAI layers [{cfg.start_layer}, {cfg.end_layer}) select none of the model's "
                f"{adapter.num_layers} layers"
            )

    def on_prompt(self, state: GuardState) -> None:
        state.require_left_padding("PAI")

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if self.config.alpha == 0 or call.layer_idx not in self.layers:
            return None
        image = state.group_masks(call)["image"]
        return AttentionEdit(key_boost=image.to(torch.float32) * self.config.alpha, last_row_only=True)

    def logits_processors(self, state: GuardState) -> list:
        if not self.config.use_cfg:
            return []
        device = state.adapter.model.device
        prompt = {k: v.to(device) for k, v in state.adapter.text_only_rows(state.call_inputs).items()}
        side = state.side_state(f"{self.name}:image-free")
        stream = SideStream(lambda inputs: state.run_side(side, inputs), prompt, state.prompt_len)
        return [ImageFreeGuidance(stream, self.config.gamma, self.config.beta)]


class ImageFreeGuidance(LogitsProcessor):
    """``gamma * (s - u) + u`` with ``u`` from the image-free side stream (see the module docstring)."""

    def __init__(self, stream: SideStream, gamma: float, beta: float):
        self.stream, self.gamma, self.beta = stream, gamma, beta

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return log_prob_guidance(scores, self.stream.next_logits(input_ids), self.gamma, self.beta)


register_method("pai", PAIConfig, PAI, "pay more attention to image: boost image-key attention logits")
