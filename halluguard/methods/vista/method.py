"""VISTA: visual steering vector and self-logits augmentation (Li et al., ICML 2025, "The Hidden Life
of Tokens"; official code LzVv123456/VISTA).

**Visual steering vector.** Before the prompt's forward, the prompt runs twice, unsteered: as it is
(``+``) and without its image (``-``, the image tokens and their delimiters removed). With
``h^l_±`` the residual stream leaving decoder layer ``l`` at each prompt's last token, the
vector of layer ``l`` is ``v_l = h^l_+ - h^l_-``. From then on, at every forward and every
position, each steered layer's feed-forward output ``x`` becomes::

    s   = lamda * (1 + max(0, cos(x, -v_l))) * v_l / |v_l|
    x' = |x| * normalize(x / |x| + s),

a rotation towards the image's direction whose strength grows where ``x`` points away from it,
with ``|x|`` kept (``steering.py``'s ``VSVLayer`` around every ``layer.mlp``, ``llm_layers.py``).

**Self-logits augmentation (SLA).** With ``h^l`` the residual stream leaving layer ``l`` at the
forward's last position and ``W`` the output embeddings (no final norm: the official model's
``hidden_states[1:]`` are raw layer outputs), the next-token logits become::

    z' = (1 - a) * z + a * mean_{l = first..last} W h^l = (1 - a) * z + a * W mean_l h^l,

one output-embedding product per step (``W`` is linear, so the mean moves inside). The official
window is layers 25 to 30 of LLaMA's 32 (``--logits-layers 25,30``); for another depth ``L`` the
default scales it: ``round(25 L / 32)`` to ``round(30 L / 32)``, at most ``L - 2`` (22 to 26 of 28).

Official settings: ``lamda`` 0.17 (CHAIR, ``run_chair.sh``) or 0.01 (POPE, ``run_pope.sh``), SLA on
with ``a = 0.3``, greedy search, every layer steered.

Where this follows the code rather than the paper, or goes beyond it:

* ``obtain_vsv`` fits a one-component PCA to the single difference and returns
  ``components_ + mean_``: the mean is the difference itself, the component the first right singular
  vector of an all-zero matrix (a unit vector spread over all layers, of no meaning). This uses
  ``v_l = h^l_+ - h^l_-`` without that artefact, as the paper states it.
* The official runs take one image at a time (its assert), so one vector per image; here each row
  has its own vector, so batches (left-padded) and beams give every prompt its own.
* The official model runs in float16 and returns the steered output in float16; the rotation is
  computed in float32 here and returned in the model's dtype.
* SLA's layers are absolute in the official flags; ``logits_first_layer`` and ``logits_last_layer``
  set them, the default scales the official window to the model's depth.

In a composition VISTA acts in the main stream only: a contrastive method's branch (VCD's noised
image, M3ID's image-free prompt) stays the plain model, so the contrast also pushes away from the
unsteered model. Cost: one extra forward over the prompt (the prompt and its image-free copy as rows
of one forward), then per step and layer a norm, a cosine and a rotation of the feed-forward
output, and one output-embedding row, which joins the model's own product with the output
embeddings (one read of them for both; ``Method.rows_to_project``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn import functional as F

from ...decoding import Probe
from ...decoding.layout import text_only_rows
from ...state import GuardState
from ..base import Method
from .config import CAPABILITIES, VISTAConfig

EPS = 1e-12  # F.normalize's floor on a norm


@dataclasses.dataclass
class VISTAData:
    """Per call: the unsteered last-token residual streams (``layer -> (rows, d)``), then the steering
    vectors ``(layers, rows, d)``; the running sum of the late layers' last-position outputs."""

    positive: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    negative: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    vectors: torch.Tensor | None = None  # unit vectors v_l / |v_l| (only their direction acts)
    late_sum: torch.Tensor | None = None
    late_count: int = 0
    late_logits: torch.Tensor | None = None  # W mean_l h^l of this forward, out of the model's own product


def steer(output: torch.Tensor, unit: torch.Tensor, lamda: float) -> torch.Tensor:
    """``output`` ``(rows, T, d)`` rotated towards ``unit = v / |v|`` ``(rows, d)`` (see the module
    docstring): ``1 + max(0, cos(x, -v)) = 1 - min(0, x_hat . unit)``; a zero ``x`` stays zero."""
    x = output.float()
    length = x.norm(dim=-1, keepdim=True)
    direction = x / length.clamp_min(EPS)
    towards = unit[:, None, :]
    strength = 1.0 - (direction * towards).sum(-1, keepdim=True).clamp_max(0.0)
    turned = direction + lamda * strength * towards
    return (turned * (length / turned.norm(dim=-1, keepdim=True).clamp_min(EPS))).to(output.dtype)


class VISTA(Method):
    """Visual steering vector and self-logits augmentation (see the module docstring)."""

    config_cls = VISTAConfig
    capabilities = CAPABILITIES
    reads_layer_outputs = True
    edits_mlp_outputs = True
    augments_next_logits = True
    projects_rows = True

    def setup(self, adapter: Any) -> None:
        depth = adapter.num_layers
        first, last = self.logit_layers(depth)
        if not 0 <= first <= last < depth:
            raise ValueError(f"vista: logits layers {first}..{last} do not fit the model's {depth} layers")
        end = self.config.steer_end_layer
        if self.config.steer_start_layer >= depth or (end is not None and end > depth):
            raise ValueError(f"vista: steered layers do not fit the model's {depth} layers")

    def logit_layers(self, depth: int) -> tuple[int, int]:
        """The first and last (inclusive) layer whose outputs SLA reads."""
        cfg = self.config
        late = max(0, depth - 2)  # the official window ends below the last layer
        first = min(round(25 * depth / 32), late) if cfg.logits_first_layer is None else cfg.logits_first_layer
        last = max(first, min(round(30 * depth / 32), late)) if cfg.logits_last_layer is None else cfg.logits_last_layer
        return first, last

    def new_call_state(self) -> VISTAData:
        return VISTAData()

    def streams(self, state: GuardState, inputs: dict[str, Any]) -> list[Any]:
        if self.config.lamda == 0 or state.role.kind != "main":
            return []
        state.require_left_padding("vista")
        inputs = state.with_2d_mask(inputs)
        image_free = text_only_rows(inputs, state.adapter.image_and_marker_mask(inputs["input_ids"]))
        return [Probe(self, image_free, apart=True)]

    def on_layer_output(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None:
        data = state.data_of(self)
        if self.config.lamda and data.vectors is None:
            self._read_unsteered(state, data, layer_idx, hidden_states)
        elif self.config.logits_alpha and state.role.kind == "main" and state.for_generation:
            first, last = self.logit_layers(state.adapter.num_layers)
            if first <= layer_idx <= last:
                latest = hidden_states[:, -1].float()
                fresh = layer_idx == first
                data.late_sum = latest if fresh else data.late_sum + latest
                data.late_count = 1 if fresh else data.late_count + 1

    def _read_unsteered(self, state: GuardState, data: VISTAData, layer_idx: int, hidden: torch.Tensor) -> None:
        """The probe's forward: the prompt (a copy of the main rows) and its image-free rows."""
        side = data.negative if state.role.is_probe_of(self) else data.positive
        side[layer_idx] = hidden[:, -1].float()
        depth = state.adapter.num_layers
        if len(data.positive) == depth and len(data.negative) == depth:
            data.vectors = F.normalize(torch.stack([data.positive[i] - data.negative[i] for i in range(depth)]), dim=-1)

    def edit_mlp_output(
        self, state: GuardState, layer_idx: int, mlp_input: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None:
        cfg = self.config
        vectors = state.data_of(self).vectors
        end = cfg.steer_end_layer if cfg.steer_end_layer is not None else state.adapter.num_layers
        if vectors is None or state.role.kind != "main" or not cfg.steer_start_layer <= layer_idx < end:
            return None
        return steer(output, state.rows_of(vectors[layer_idx]).to(output.device), cfg.lamda)

    def late_mean(self, state: GuardState, data: VISTAData) -> torch.Tensor:
        """``mean_l h^l`` over SLA's layers, in the output embeddings' dtype."""
        weight = state.adapter.model.get_output_embeddings().weight
        return (data.late_sum / data.late_count).to(weight.dtype)

    def rows_to_project(self, state: GuardState) -> torch.Tensor | None:
        data = state.data_of(self)
        if not self.config.logits_alpha or data.late_sum is None or state.role.kind != "main":
            return None
        return self.late_mean(state, data)

    def on_projected_rows(self, state: GuardState, logits: torch.Tensor) -> None:
        state.data_of(self).late_logits = logits

    def augment_next_logits(self, state: GuardState, logits: torch.Tensor) -> torch.Tensor:
        data, alpha = state.data_of(self), self.config.logits_alpha
        if not alpha or data.late_sum is None:
            return logits
        late, data.late_logits = data.late_logits, None
        if late is None:  # the model's product held more than its last position: project apart
            late = state.adapter.unnormed_logits(self.late_mean(state, data))
        return (1.0 - alpha) * logits + alpha * late.float().to(logits.device)
