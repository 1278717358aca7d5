"""MemVR: memory-space visual retracing (Zou et al., ICML 2025, "Look Twice Before You Answer";
official code 1zhou-Wang/MemVR).

At every forward, after each decoder layer ``l`` with ``start < l < end``, the logit lens reads the
next-token distribution at the forward's last position: ``z^l = W norm(h^l)``, and its uncertainty
over the ten likeliest tokens,

    H^l = -sum_{k in top10} p_k log p_k / ln 10,      p = softmax(top-10 of z^l).

At the first layer where ``H^l > entropy_threshold`` (once per forward), the image is re-read in the
feed-forward block of layer ``l + 1``: with ``x`` that block's input ``(T, d)``, ``f`` its output and
``Z`` the row's image tokens as the text model received them ``(n, d)`` (the projected visual
features), the memory read ``a = (x Z^T) Z`` is mixed in at the scale of ``f``::

    f' = (1 - r) f + r * (mean|f| / mean|a|) * a,        r = retracing_ratio,

over every position of the forward (the whole prompt at the prompt's forward, the new token after).
(``memvr.py``: ``LlamaMLP.forward`` with ``adpt_sign = 1``, its ``adpt_w1 = c1 Z`` and
``adpt_w2 = c2 Z^T`` scaled by the up and down projections' mean magnitudes, which the mean
normalisation cancels; the entropy test in the patched ``LlamaModel.forward``.)

Official settings (``eval/llava_model_vqa_loader_chair.py``, the README): ``r = 0.12``, threshold
0.75, layers 5 and 16 (read 6 to 15, retrace into 7 to 16), greedy search.

Where this differs from the code:

* The official forward keeps one ``visual_token`` for the batch (the last image's features) and one
  entropy for the batch (summed over rows, run at batch 1); here each row has its own memory (all
  its image tokens, several images included) and its own test, so batches and beams are per row.
* ``mean|f|`` and ``mean|a|`` run over the row's real positions (the official, at batch 1, over its
  whole tensor; padding is excluded here).
* The official patch reads the logit lens after every layer; here only ``start < l < end``, and only
  for rows that have not retraced in the forward (the same result, less work).
* For a depth other than LLaVA-1.5-7B's 32, the default layers scale with it (``round(5/32 L)``,
  ``round(16/32 L)``).

MemVR acts in the main stream only. Cost per forward: up to ``end - start - 1`` logit-lens rows
(a norm and an output-embedding product each) and, where it retraces, two ``(T, d) x (d, n)``
products in one layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ...state import GuardState
from ..base import Method
from .config import CAPABILITIES, MemVRConfig


@dataclasses.dataclass
class MemVRData:
    """Per call: each row's image tokens ``(rows, n, d)`` (zero rows pad shorter ones, which adds
    nothing to ``x Z^T Z``) and, for the forward in progress, the layer each row retraces into (-1:
    none yet)."""

    memory: torch.Tensor | None = None
    target: torch.Tensor | None = None


def top_entropy(logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """``(rows,)``: entropy of the softmax over the ``k`` largest logits, divided by ``ln k``."""
    p = torch.softmax(logits.float().topk(min(k, logits.shape[-1]), dim=-1).values, dim=-1)
    return -(p * p.log()).sum(-1) / math.log(k)


def retrace(mlp_input: torch.Tensor, output: torch.Tensor, memory: torch.Tensor, ratio: float, valid: torch.Tensor):
    """``(1 - r) f + r (mean|f| / mean|a|) a`` with ``a = x Z^T Z`` per row; means over ``valid``
    positions ``(rows, T)``."""
    x, f, z = mlp_input.float(), output.float(), memory.to(mlp_input.device).float()
    read = (x @ z.transpose(1, 2)) @ z
    weight = valid[..., None].to(f.dtype)
    scale = (f.abs() * weight).sum((1, 2)) / (read.abs() * weight).sum((1, 2)).clamp_min(1e-12)
    return ((1 - ratio) * f + ratio * scale[:, None, None] * read).to(output.dtype)


class MemVR(Method):
    """Visual retracing (see the module docstring)."""

    config_cls = MemVRConfig
    capabilities = CAPABILITIES
    reads_layer_inputs = True
    reads_layer_outputs = True
    edits_mlp_outputs = True

    def setup(self, adapter: Any) -> None:
        start, end = self.layers(adapter.num_layers)
        if end > adapter.num_layers or end <= start + 1:
            raise ValueError(f"memvr: layers {start} to {end} leave none to read in the model's {adapter.num_layers}")

    def layers(self, depth: int) -> tuple[int, int]:
        """The exclusive bounds of the layers read."""
        cfg = self.config
        start = cfg.start_layer if cfg.start_layer is not None else round(5 * depth / 32)
        end = cfg.end_layer if cfg.end_layer is not None else max(start + 2, round(16 * depth / 32))
        return start, min(end, depth)

    def new_call_state(self) -> MemVRData:
        return MemVRData()

    def _acts(self, state: GuardState) -> bool:
        return self.config.retracing_ratio > 0 and state.role.kind == "main"

    def on_layer_input(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None:
        if layer_idx != 0 or not self._acts(state):
            return
        data = state.data_of(self)
        data.target = torch.full((hidden_states.shape[0],), -1, dtype=torch.long, device=hidden_states.device)
        if data.memory is None and state.in_prefill:
            data.memory = self._image_tokens(state, hidden_states)

    def _image_tokens(self, state: GuardState, embeds: torch.Tensor) -> torch.Tensor:
        """The image tokens of each row of the prompt's forward, zero-padded to the longest."""
        image = state.groups.image[:, state.past_len : state.seen_tokens].to(embeds.device)
        if image.shape[1] != embeds.shape[1] or not bool(image.any(1).all()):
            raise ValueError("memvr re-reads each row's image: every prompt needs its image in one forward")
        counts = image.sum(1)
        memory = embeds.new_zeros(embeds.shape[0], int(counts.max()), embeds.shape[-1])
        for r in range(embeds.shape[0]):
            memory[r, : int(counts[r])] = embeds[r, image[r]]
        return memory

    def on_layer_output(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None:
        data = state.data_of(self)
        start, end = self.layers(state.adapter.num_layers)
        if not self._acts(state) or data.target is None or not start < layer_idx < end:
            return
        waiting = (data.target < 0).nonzero().flatten()
        if not len(waiting):
            return
        lens = state.adapter.logit_lens(hidden_states[waiting, -1])
        unsure = waiting[top_entropy(lens) > self.config.entropy_threshold]
        data.target[unsure] = layer_idx + 1

    def edit_mlp_output(
        self, state: GuardState, layer_idx: int, mlp_input: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None:
        data = state.data_of(self)
        if not self._acts(state) or data.target is None or data.memory is None:
            return None
        rows = (data.target == layer_idx).nonzero().flatten()
        if not len(rows):
            return None
        valid = state.groups.valid[:, state.past_len : state.seen_tokens].to(output.device)
        if valid.shape[1] != output.shape[1]:
            valid = torch.ones(output.shape[:2], dtype=torch.bool, device=output.device)
        memory = state.rows_of(data.memory)
        edited = output.clone()
        edited[rows] = retrace(mlp_input[rows], output[rows], memory[rows], self.config.retracing_ratio, valid[rows])
        return edited
