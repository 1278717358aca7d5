"""The demo's attention picture: how much each (layer, head) attends to the image while answering.

``ImageAttentionMeter`` edits nothing: at every forward of the main stream it asks each layer for the
attention mass of the last query row on the image tokens (``Reductions.group_masses``, no attention
map), and averages it over the answer's steps. ``save_heatmap`` draws the image beside the
(layer x head) map with matplotlib.
"""

from __future__ import annotations

import dataclasses

import torch

from halluguard.attention import AttentionEdit, Reductions
from halluguard.config import MethodConfig
from halluguard.methods.base import Method


@dataclasses.dataclass
class MeterConfig(MethodConfig):
    name = "image-attention-meter"


class ImageAttentionMeter(Method):
    """Mean image-attention mass per (layer, head) over the generated steps (first row of the batch)."""

    config_cls = MeterConfig

    def __init__(self):
        super().__init__(MeterConfig())
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def attention_edit(self, state, call):
        if state.role.kind != "main":
            return None
        return AttentionEdit(reductions=Reductions({"image": state.group_masks(call)["image"]}))

    def on_stats(self, state, call, stats):
        mass = stats["mass/image"][0].float().cpu()
        self.sums[call.layer_idx] = self.sums.get(call.layer_idx, 0) + mass
        self.counts[call.layer_idx] = self.counts.get(call.layer_idx, 0) + 1

    @property
    def steps(self) -> int:
        return max(self.counts.values(), default=0)

    def table(self) -> torch.Tensor:
        """(layers, heads) mean mass on the image."""
        return torch.stack([self.sums[i] / self.counts[i] for i in sorted(self.sums)])


def save_heatmap(meter: ImageAttentionMeter, image, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = meter.table().numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    left.imshow(image)
    left.set_axis_off()
    shown = right.imshow(table, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(table.max()), 1e-6))
    right.set_xlabel("head")
    right.set_ylabel("layer")
    right.set_title(f"attention mass on the image, mean of {meter.steps} steps")
    fig.colorbar(shown, ax=right)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        from .core import DemoError

        raise DemoError(f"cannot write {path} ({err.strerror or err})") from None
    finally:
        plt.close(fig)
