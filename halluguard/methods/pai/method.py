"""PAI: paying more attention to image (Liu et al., ECCV 2024).

Two parts, both on by default (the paper's method and the official run commands:
``--use-attn --use-cfg --gamma 1.1``):

**Amplification.** In layers ``[start_layer, end_layer)``, for the last query row of a forward
(the new token at each decode step), the pre-softmax logits on image keys become
``z + alpha * |z|``: positive logits grow by ``1 + alpha``, negative ones shrink by ``1 - alpha``.
Image keys are each row's own image tokens (from ``input_ids``), so batches with padding and
several images are handled per row.

**Image-free guidance** (``use_cfg``). A branch stream is fed the prompt without its image (image
tokens and their delimiters removed; the plain model: no method acts in it, as in the official
code, so ``u`` is the unguarded model's view) and the same generated tokens. With ``s`` and ``u``
the log-softmax of the main and image-free next-token scores, the scores become
``gamma * (s - u) + u`` and tokens with ``s < max(s) + ln(beta)`` are cut (``-inf``). The branch
is prefilled at its own (short) length and then rides along every main forward as extra rows
(``halluguard.decoding.streams.Branch``), so a step costs one forward; ``separate_stream`` runs
it as a second forward per step instead (the official way; same scores). The guidance acts on
the scores after the generation config's own processors (in beam search, on its log-probabilities).

``control=True`` is the guidance's control row: the image-free branch is not run and the scores are
only cut (``s >= max(s) + ln(beta)``), amplification as with guidance; a gain over it is the
contrast's, one of it over plain decoding the cutoff's and amplification's.

Where the official code and the paper differ, the code is followed, with options:

* with guidance on, the official code does not amplify the forward that produces the first token
  (its attention patch is skipped while the guidance flag is set, and the flag is cleared after
  the first image-free pass), so amplification acts from the second token on;
  ``amplify_first_token=True`` amplifies that forward too. Without guidance every forward is
  amplified, the prompt's included;
* with ``gamma = 1`` the official processor returns the scores unchanged, with no cutoff, before
  its first image-free pass, so the flag that holds amplification back is never cleared: guidance
  on at ``gamma = 1`` decodes exactly as plain decoding, and does so here (no branch, no
  amplification). ``use_cfg=False`` gives amplification alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import LogitsProcessor

from ...adapters import Adapter
from ...attention.edits import AttentionCall, AttentionEdit
from ...decoding import Branch, contrast, cutoff
from ...decoding.layout import text_only_rows
from ...state import GuardState, KeyGroups
from ..base import Method
from .config import CAPABILITIES, PAIConfig


@dataclasses.dataclass
class PAICall:
    """Per call: the boost ``alpha`` on the image keys, for key positions up to twice the prompt or
    more (``boost``), and the rows' key groups it was made for; a forward's boost is its slice."""

    boost: torch.Tensor | None = None
    groups: KeyGroups | None = None


class PAI(Method):
    """Image-key logit amplification and image-free guidance (see the module docstring)."""

    config_cls = PAIConfig
    capabilities = CAPABILITIES

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
        cfg = self.config
        if cfg.alpha == 0 or call.layer_idx not in self.layers or (cfg.use_cfg and not cfg.guided):
            return None  # guidance on at gamma 1: the official code never amplifies (module docstring)
        if call.is_prefill and cfg.use_cfg and not cfg.amplify_first_token:
            self._kept_boost(state, call)  # made now, for the decode steps
            return None  # the official code leaves the first token's forward alone when guidance is on
        return AttentionEdit(key_boost=self._boost(state, call), last_row_only=True)

    def new_call_state(self) -> PAICall:
        return PAICall()

    def _boost(self, state: GuardState, call: AttentionCall) -> torch.Tensor:
        """``alpha`` on the call's image keys (keys at positions ``key_offset + j``), 0 elsewhere: one
        slice of the boost kept for the call, the same tensor for every layer of a forward."""
        kept, start, end = self._kept_boost(state, call), call.key_offset, call.key_offset + call.kv_len
        return state.derived.get("pai boost", (kept,), lambda: kept[:, start:end], key=(start, end))

    def _kept_boost(self, state: GuardState, call: AttentionCall) -> torch.Tensor:
        """``alpha`` on the image keys, 0 elsewhere, ``(B, 2 T)`` for ``T`` the keys up to the call's last
        (or the image groups' width): kept until a call reaches past it, the groups change or the
        device does."""
        data = state.data_of(self)
        end = call.key_offset + call.kv_len
        kept = data.boost
        if kept is None or data.groups is not state.groups or kept.shape[1] < end or kept.device != call.device:
            image = state.groups.image.to(device=call.device, dtype=torch.float32) * self.config.alpha
            data.boost = torch.nn.functional.pad(image, (0, 2 * max(end, image.shape[1]) - image.shape[1]))
            data.groups = state.groups
        return data.boost

    def streams(self, state: GuardState, inputs: dict[str, Any]) -> list[Branch]:
        if not self.config.guided or self.config.control:
            return []
        inputs = state.with_2d_mask(inputs)
        prompt = text_only_rows(inputs, state.adapter.image_and_marker_mask(inputs["input_ids"]))
        return [Branch(self, prompt, methods=(), separate=self.config.separate_stream)]

    def logits_processors(self, state: GuardState) -> list:
        if not self.config.guided:
            return []
        return [PlausibilityCutoff(self.config.beta)] if self.config.control else [ImageFreeGuidance(state, self)]


class PlausibilityCutoff(LogitsProcessor):
    """PAI's control row: the guidance's cutoff ``s >= max(s) + ln(beta)`` on the log-softmax scores,
    without the image-free contrast."""

    def __init__(self, beta: float):
        self.beta = beta

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return cutoff(scores, self.beta, space="log_probs").to(scores.dtype)


class ImageFreeGuidance(LogitsProcessor):
    """``gamma * (s - u) + u`` with ``u`` from the image-free branch (see the module docstring)."""

    def __init__(self, state: GuardState, method: PAI):
        self.state, self.method = state, method

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cfg = self.method.config
        free = self.state.branch_logits(self.method, input_ids)
        return contrast(scores, free, cfg.gamma, cfg.gamma - 1.0, space="log_probs", beta=cfg.beta).to(scores.dtype)
