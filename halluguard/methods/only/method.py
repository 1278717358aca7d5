"""ONLY: one-layer intervention (Wan et al., ICCV 2025, "ONLY: One-Layer Intervention Sufficiently
Mitigates Hallucinations in Large Vision-Language Models"; official code zifuwan/ONLY, in its fork of
transformers' ``modeling_llama.py`` and ``llava_llama.py``, and ``only_utils/only_sample.py``).

At every forward, at layer ``k`` (``layer``, 0) and the last query row, with ``a_h`` each head's
attention probabilities over the keys, ``T`` the text keys (every real key after the first one that
is not an image token, generated tokens included) and ``I`` the image keys:

1. in ``T`` and in ``I`` separately, keys with ``a_h > mean + std`` over the set are zeroed;
2. the text-to-visual entropy ratio of each head, ``r_h = H(a_h|T) / H(a_h|I)`` with ``a_h|S`` the
   zeroed probabilities renormalised over ``S`` and ``H(p) = -sum p log(p + 1e-6)``;
3. heads with ``r_h < mean_h r_h`` are dropped (all their probabilities zeroed); the first key's
   probability stays; nothing is renormalised;
4. ``o = W_O [a'_h V_h]_h``: the layer's attention output under these probabilities.

``o`` skips the rest of the network and is read out at the last layer ``L``, with ``x`` the residual
stream entering it and ``h_L`` the model's final hidden state (after the final norm)::

    u = LN_in(o) + 0.2 x,   u = u + MLP(LN_post(u)),   l_only = W_out (norm(u) + 0.5 h_L).

The next-token logits ``l`` and ``l_only`` are then combined by their total variation
``tv = sum |softmax(l) - softmax(l_only)|``: where ``tv < gamma``, ``l + 3 l_only``; elsewhere
``2 l - l_only``; under the plausibility cutoff ``l >= max(l) + ln 0.1``. The official runs sample
(temperature 1, top-p 1, no top-k), ``gamma`` 0.2 (POPE) or 0.25 (CHAIR), ``k = 0``.

Where this differs from the code: the official code finds the image at fixed positions (35 to 610,
LLaVA-1.5's 576 tokens after its 35-token system prompt) and the first key at position 0; here both
come from each row's ids (left padding, any family, several images). Its head ratio and its total
variation are taken over the batch (it runs one image at a time); here per row. It computes ``o`` at
every query row; only the last one reaches the next-token logits, so only that one is computed.

The decoder layers must have LLaMA's layout (``input_layernorm``, ``post_attention_layernorm``,
``mlp``): LLaVA-1.5/NeXT/OneVision, the Qwen-VL and Idefics3/SmolVLM backbones; Gemma 3's layers
(norms around the feed-forward block) are refused. Cost per step: the attention row of one layer
over its values, one ``W_O`` row, one feed-forward row of the last layer and one output-embedding
row, which joins the model's own product with the output embeddings (one read of them for both;
``Method.rows_to_project``); no extra forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...attention.edits import AttentionCall, AttentionEdit, Reductions
from ...decoding import contrast, cutoff
from ...state import GuardState
from ..base import Method
from .config import CAPABILITIES, ONLYConfig


@dataclasses.dataclass
class ONLYData:
    """Per forward: the intervened attention output at the last position ``(rows, d)``, the residual
    entering the last layer there, the read-out and its next-token logits."""

    carried: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    read_out: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def drop_outliers(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``probs`` ``(B, H, T)`` on the keys ``keys`` ``(B, T)`` with entries above their set's
    ``mean + std`` (per row and head) set to 0; other keys unchanged."""
    inside = keys[:, None, :].expand_as(probs)
    count = inside.sum(-1, keepdim=True)
    values = torch.where(inside, probs, 0.0)
    mean = values.sum(-1, keepdim=True) / count.clamp_min(1)
    spread = torch.where(inside, (probs - mean) ** 2, 0.0).sum(-1, keepdim=True) / (count - 1).clamp_min(1)
    return torch.where(inside & (probs > mean + spread.sqrt()), 0.0, probs)


def set_entropy(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(B, H)``: ``-sum p log(p + 1e-6)`` of ``probs`` renormalised over ``keys``."""
    inside = torch.where(keys[:, None, :], probs, 0.0)
    p = inside / inside.sum(-1, keepdim=True)
    return -(p * torch.log(p + 1e-6)).sum(-1)


def intervened_probabilities(probs: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Steps 1 to 3 of the module docstring on the last row's probabilities ``(B, H, T)``."""
    edited = drop_outliers(drop_outliers(probs, text), image)
    ratio = set_entropy(edited, text).nan_to_num(0.0) / set_entropy(edited, image).nan_to_num(float("inf"))
    dropped = ratio < ratio.mean(-1, keepdim=True)
    return torch.where(dropped[..., None], 0.0, edited)


class ONLY(Method):
    """One-layer intervention (see the module docstring)."""

    config_cls = ONLYConfig
    capabilities = CAPABILITIES
    reads_layer_inputs = True
    reads_layer_outputs = True
    projects_rows = True

    def setup(self, adapter: Any) -> None:
        depth = adapter.num_layers
        if not self.config.layer < depth - 1:
            raise ValueError(f"only: layer {self.config.layer} must be below the last of the model's {depth} layers")
        last = adapter.decoder_layers()[-1]
        if hasattr(last, "pre_feedforward_layernorm") or not all(
            hasattr(last, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")
        ):
            raise ValueError(
                f"only: {type(last).__name__} has not LLaMA's layer layout (input_layernorm, post_attention_layernorm, "
                "mlp), which ONLY's read-out at the last layer is written for"
            )

    def new_call_state(self) -> ONLYData:
        return ONLYData()

    def _acts(self, state: GuardState) -> bool:
        return state.role.kind == "main" and state.for_generation and not self.config.control

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if call.layer_idx != self.config.layer or not self._acts(state) or self.at_neutral_strength():
            return None
        return AttentionEdit(reductions=Reductions(last_row_values=True))

    def at_neutral_strength(self) -> bool:
        return self.config.alpha_pos == 0 and self.config.alpha_neg == 0

    def on_stats(self, state: GuardState, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None:
        probs, values = stats["last_row"], stats["values"]
        masks = state.group_masks(call)
        real = masks["context"] | masks["generated"]
        first = torch.zeros_like(real)
        first.scatter_(1, real.long().argmax(1, keepdim=True), True)  # each row's first real key
        text = real & ~masks["image"] & ~first
        kept = intervened_probabilities(probs, text, masks["image"])
        grouped = values.float().repeat_interleave(probs.shape[1] // values.shape[1], dim=1)  # (B, H, T, D)
        heads = torch.einsum("bht,bhtd->bhd", kept, grouped)
        module = state.adapter.attention_modules()[call.layer_idx]
        weight = module.o_proj.weight
        state.data_of(self).carried = module.o_proj(heads.reshape(heads.shape[0], -1).to(weight.dtype))

    def on_layer_input(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None:
        if layer_idx == state.adapter.num_layers - 1 and self._acts(state):
            state.data_of(self).residual = hidden_states[:, -1]

    def on_layer_output(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None:
        data = state.data_of(self)
        if layer_idx != state.adapter.num_layers - 1 or not self._acts(state) or data.carried is None:
            return
        cfg, adapter = self.config, state.adapter
        last = adapter.decoder_layers()[-1]
        u = last.input_layernorm(data.carried) + cfg.residual_weight * data.residual
        # the read-out is ONLY's own computation: .forward keeps other methods' feed-forward hooks out of it
        u = u + last.mlp.forward(last.post_attention_layernorm(u))
        norm = adapter.decoder().norm
        data.read_out = norm(u) + cfg.output_weight * norm(hidden_states[:, -1])
        data.carried = data.logits = None

    def rows_to_project(self, state: GuardState) -> torch.Tensor | None:
        return state.data_of(self).read_out

    def on_projected_rows(self, state: GuardState, logits: torch.Tensor) -> None:
        data = state.data_of(self)
        data.logits, data.read_out = logits, None

    def next_token_logits(self, state: GuardState, logits: torch.Tensor) -> torch.Tensor:
        cfg, data = self.config, state.data_of(self)
        if cfg.control or self.at_neutral_strength():
            return cutoff(logits, cfg.beta) if cfg.control else logits
        if data.logits is None:  # the model's product held more than its last position: project apart
            data.logits = state.adapter.model.get_output_embeddings()(data.read_out)
        other, data.logits, data.read_out = data.logits.float().to(logits.device), None, None
        tv = (torch.softmax(logits.float(), -1) - torch.softmax(other, -1)).abs().sum(-1, keepdim=True)
        agree = tv < cfg.gamma
        w_main = torch.where(agree, 1.0, 1.0 + cfg.alpha_neg)
        w_other = torch.where(agree, -cfg.alpha_pos, cfg.alpha_neg)
        return contrast(logits, other, w_main, w_other, space="logits", beta=cfg.beta)
