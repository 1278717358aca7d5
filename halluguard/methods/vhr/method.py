"""VHR: vision-aware head reinforcement (He et al., ACL 2025).

Per layer ``l`` in the reinforced set and head ``i``, with ``A_li`` the head's output (before
``o_proj``) at the last prompt position:

* ``VHD_li = || A_li(prompt with image) - A_li(prompt without image) ||_2``;
* outlier filter (on by default): with ``TA_li = || A_li(without image) ||^2``, set ``VHD_li = 0``
  when ``VHD_li > mean_i VHD + std_i VHD`` and ``TA_li > mean_i TA + std_i TA`` (a head that surges
  when the image is removed is not vision-aware); ``std`` is PyTorch's default (Bessel-corrected);
* selection: ``H_l = {i : VHD_li > median_i VHD_li}`` (about half the heads);
* reinforcement: ``A_li <- alpha * A_li`` for ``i`` in ``H_l``.

Selection happens layer by layer inside one forward: when layer ``l`` is measured, the layers
before it are already reinforced, in both streams. The guard runs this as one extra forward at
the first step: the prompt's own forward carries, as extra batch rows (a *probe*, see
``halluguard.decoding.streams``), the same prompts with the image removed (image tokens and the
image-delimiter tokens the config names; left-padded, text positions counted from 0 as a separate
text-only prompt would). At each reinforced layer the hook reports both streams' head outputs at
the last position, VHR picks each row's heads, and the layer's output is scaled, in both streams,
before the next layer runs. The probe rows are then dropped: the prompt rows of that forward are
the reinforced prefill, and every later step reuses the heads (a fixed per-(row, head) output
scale). The prompt phase costs one forward of twice the rows (about 2x a plain prefill); with a
static or caller-supplied cache, which cannot take extra rows, the probe runs as its own forward
before the prompt's (about 3x).

**Which positions are scaled.** All positions, at the prompt and at every generated token: the
prompt's keys and values then come from the reinforced model, so the cache is what the reinforced
model would compute (the paper fixes the heads at the first step for this consistency). The heads
picked at layer ``l`` see the states of the reinforced layers below ``l`` in both streams (the two
streams in lock-step). Decoding costs one multiply per head output on the reinforced layers.

**Layers.** Default: layer 1 plus the last ``round(14 * L / 32)`` layers of an ``L``-layer text
model (LLaVA-1.5-7B, ``L = 32``: ``[1, 18..31]``, the paper's choice); ``layers=[...]`` picks
them explicitly. ``fixed_heads={layer: [heads]}`` (e.g. a JSON head profile) skips the selection
and reinforces those heads in every row.

Batches: heads are chosen per row (beams and sampled sequences of one prompt share them). A call
that starts from a filled cache, or a prompt forwarded in chunks, is refused: the selection needs
the whole prompt at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ...adapters import Adapter
from ...attention.edits import AttentionCall, AttentionEdit, Reductions
from ...decoding.layout import text_only_rows
from ...decoding.streams import Probe
from ...state import GuardState
from ..base import Method
from .config import CAPABILITIES, VHRConfig


def default_layers(num_layers: int, include_layer1: bool = True) -> tuple[int, ...]:
    """Layer 1 (if asked) and the last ``round(14 * L / 32)`` layers (``[1, 18..31]`` for ``L = 32``)."""
    last = max(round(14 * num_layers / 32), 1)
    layers = set(range(max(num_layers - last, 0), num_layers))
    if include_layer1 and num_layers > 1:
        layers.add(1)
    return tuple(sorted(layers))


def head_divergence(with_image: torch.Tensor, text_only: torch.Tensor, outlier_filter: bool = True) -> torch.Tensor:
    """VHD ``(B, H)`` from head outputs ``(B, H, D)`` of both streams, after the optional outlier filter."""
    vhd = (with_image.float() - text_only.float()).norm(dim=-1)
    if outlier_filter and vhd.shape[-1] > 1:
        ta = text_only.float().pow(2).sum(-1)
        surging = (vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)) & (
            ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True)
        )
        vhd = vhd.masked_fill(surging, 0.0)
    return vhd


def select_heads(vhd: torch.Tensor) -> torch.Tensor:
    """``(B, H)`` bool: heads whose VHD is above their layer's median (the lower median for even H)."""
    return vhd > vhd.median(dim=-1, keepdim=True).values


@dataclasses.dataclass
class VHRCall:
    """VHR's data for one call, shared by the main stream and its text-only probe."""

    # layer -> (B, H) bool: the chosen heads
    heads: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    # layer -> (B, H) float: the head scales of the chosen heads (made when they are chosen)
    scales: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    # layer -> "image" | "text" stream -> (B, H, D) head outputs, while the layer's heads are chosen
    outputs: dict[int, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


class VHR(Method):
    """Vision-aware head reinforcement (see the module docstring).

    ``on_select(layer, vhd, heads)``, if given, is called at each reinforced layer during the
    selection with the VHD values ``(B, H)`` and the chosen heads ``(B, H)`` (for analysis, or to
    build a head profile for ``fixed_heads``).
    """

    config_cls = VHRConfig
    capabilities = CAPABILITIES
    shares_data_with_branches = True  # the branch reinforces the heads chosen in the main stream

    def __init__(
        self,
        config: VHRConfig | None = None,
        on_select: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
    ):
        super().__init__(config)
        self.on_select = on_select

    def setup(self, adapter: Adapter) -> None:
        cfg = self.config
        num_layers, num_heads = adapter.num_layers, adapter.num_heads
        self.num_heads = num_heads
        self.fixed: dict[int, torch.Tensor] | None = None
        if cfg.fixed_heads is not None:
            for layer, heads in cfg.fixed_heads.items():
                if layer >= num_layers or any(h >= num_heads for h in heads):
                    raise ValueError(
                        f"VHR fixed_heads {{{layer}: {list(heads)}}} is outside the model's "
                        f"{num_layers} layers x {num_heads} heads"
                    )
            self.fixed = {
                layer: torch.isin(torch.arange(num_heads), torch.tensor(heads, dtype=torch.long))
                for layer, heads in cfg.fixed_heads.items()
            }
            self.layers = tuple(sorted(self.fixed))
        elif cfg.layers is not None:
            outside = [layer for layer in cfg.layers if layer >= num_layers]
            if outside:
                raise ValueError(f"VHR layers {outside} are outside the model's {num_layers} layers")
            self.layers = tuple(sorted(set(cfg.layers)))
        else:
            self.layers = default_layers(num_layers, cfg.include_layer1)
        if not self.layers:
            raise ValueError("VHR has no layer to reinforce")

    def new_call_state(self) -> VHRCall:
        return VHRCall()

    # ---- selection: the text-only probe rides along the prompt's forward ------------------------
    def streams(self, state: GuardState, inputs: dict[str, Any]) -> list[Probe]:
        if self.fixed is not None:
            return []
        state.require_left_padding("VHR's head selection")
        if state.past_len or state.seen_tokens != state.prompt_len:
            raise ValueError(
                "VHR selects its heads from the whole prompt in one forward: a call that starts from "
                "a filled cache or forwards the prompt in chunks is not supported"
            )
        inputs = state.with_2d_mask(inputs)
        dropped = state.adapter.image_and_marker_mask(inputs["input_ids"])
        return [Probe(self, text_only_rows(inputs, dropped))]

    def _scale(self, heads: torch.Tensor) -> torch.Tensor:
        return torch.where(heads, self.config.alpha, 1.0).to(torch.float32)

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if call.layer_idx not in self.layers:
            return None
        if self.fixed is not None:
            fixed = self.fixed[call.layer_idx]
            name = f"vhr heads {call.layer_idx} {call.batch} {call.device}"  # the same tensor at every step
            scale = state.derived.get(
                name, (fixed,), lambda: self._scale(fixed.to(call.device)[None].expand(call.batch, -1))
            )
            return AttentionEdit(head_scale=scale)
        data = state.data_of(self)
        if call.layer_idx not in data.heads:  # selecting: report head outputs, then choose this layer's heads
            return AttentionEdit(reductions=Reductions(head_outputs=True), head_scale_from_stats=True)
        scales = state.rows_of(data.scales[call.layer_idx])
        if scales.shape[0] != call.batch:
            scales = scales.repeat_interleave(call.batch // scales.shape[0], dim=0)
        return AttentionEdit(head_scale=scales.to(call.device))

    def on_stats(self, state: GuardState, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None:
        stream = "text" if state.role.is_probe_of(self) else "image"
        state.data_of(self).outputs.setdefault(call.layer_idx, {})[stream] = stats["head_outputs"]

    def head_scale_from_stats(self, state: GuardState, call: AttentionCall) -> torch.Tensor:
        data = state.data_of(self)
        layer = call.layer_idx
        if layer not in data.heads:
            outputs = data.outputs.pop(layer)
            if "text" not in outputs:
                raise RuntimeError("VHR's text-only probe did not run beside the prompt's forward")
            vhd = head_divergence(outputs["image"], outputs["text"], self.config.outlier_filter)
            data.heads[layer] = select_heads(vhd)
            data.scales[layer] = self._scale(data.heads[layer])
            if self.on_select is not None:
                self.on_select(layer, vhd, data.heads[layer])
        return data.scales[layer]
