"""AvisC (AVC): attentional vision calibration (Woo et al., ACL Findings 2025).

**Blind tokens.** At the prompt's forward, every layer ``l`` reports the head-averaged attention
row of the last prompt token, ``r_l = mean_h a[l, h, last, :]``, from the attention hook (no
``output_attentions``). Per batch row, with ``I`` the row's image tokens:

* ``m_l = sum_{j in I} r_l[j]``, normalised over layers (``m_l / sum_l m_l``);
* layers sorted by ``m_l``, descending; ``k = #{cumulative share < layer_gamma} + 1``; the top ``k``
  layers are selected;
* ``g = mean over selected layers of r_l[I]`` (a profile over the image tokens);
* blind tokens: ``g_j >= mean(g) + lamb * std(g)`` (``std`` Bessel-corrected, as torch's default).

**Contrast branch.** The same prompt in which the image embeddings (after the projector) of the
*non*-blind image tokens are replaced: by zeros (``masking_scheme="zeros"``, the default), ones, or
N(0, 1) noise; the branch thus sees the few tokens that soak up attention and little else. It is
prefilled after the main prompt's forward and then follows the generation. With ``l`` and ``l_b``
the next-token logits of the main rows and of the branch:

    (1 + alpha) * l - alpha * l_b,   tokens with l < max(l) + ln(beta) set to -inf,

before ``generate``'s processors and warpers (the official sampler's order; the branch's logits are
replaced by the main ones for a row where they hold a NaN, as the official code does). The
official runs sample (temperature 1, no top-k, top-p 1): a guarded ``generate`` given none of
``do_sample`` and ``top_k`` (nor a generation config) samples that way; ``do_sample=False`` decodes
greedily, and beam search works too (with the default cache).

Where the official code (``avisc_utils/avisc_sample.py``) and ours differ:

* its statistics come from eager attention with ``output_attentions``; here from the attention
  hook (the same post-softmax probabilities, of the main stream's final attention);
* its image span is hard-coded (``range(35, 611)`` for LLaVA-1.5 with its system prompt) and its
  mean and std run over the whole batch tensor (batch size 1); here each row's image tokens come
  from its ids and each row has its own statistics, so batches and any template work;
* with several images in a row, their tokens form one profile;
* it runs the branch as a second forward per step; here it rides along as extra rows of the main
  forward (``separate_stream=True``: the official way, the same results).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...adapters import Adapter
from ...attention.edits import AttentionCall, AttentionEdit, Reductions
from ...state import GuardState
from ..contrastive import ContrastMethod
from .config import CAPABILITIES, AVCConfig


def select_layers(masses: torch.Tensor, gamma: float) -> torch.Tensor:
    """Indices of the layers holding the top ``gamma`` share of image attention, from ``masses (L,)``:
    ``k = #{cumulative share < gamma} + 1`` layers, in descending order of mass."""
    share = masses / masses.sum().clamp_min(torch.finfo(masses.dtype).tiny)
    ordered = torch.sort(share, descending=True)
    k = int((torch.cumsum(ordered.values, 0) < gamma).sum()) + 1
    return ordered.indices[: min(k, masses.numel())]


def blind_tokens(rows: torch.Tensor, image: torch.Tensor, gamma: float, lamb: float) -> torch.Tensor:
    """Blind image tokens of one batch row: ``rows (L, T)`` are the layers' head-averaged attention
    rows of the last prompt token, ``image (T,)`` the row's image tokens; returns ``(T,)`` bool."""
    profile = rows[:, image]  # (L, n)
    layers = select_layers(profile.sum(-1), gamma)
    g = profile[layers].mean(0)
    threshold = g.mean() + lamb * (g.std() if g.numel() > 1 else 0.0)
    blind = torch.zeros_like(image)
    blind[image] = g >= threshold
    return blind


@dataclasses.dataclass
class AVCCall:
    """AvisC's data for one call, shared by the main stream and its contrast branch."""

    rows: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (B, P) attention rows
    blind: torch.Tensor | None = None  # (B, P) bool over the main prompt's columns


class AVC(ContrastMethod):
    """Attentional vision calibration (see the module docstring)."""

    config_cls = AVCConfig
    capabilities = CAPABILITIES
    edits_input_embeds = True
    shares_data_with_branches = True

    def new_call_state(self) -> AVCCall:
        return AVCCall()

    def branch_prompt(self, state: GuardState, inputs: dict[str, Any]) -> dict[str, Any]:
        if state.seen_tokens != state.prompt_len:
            raise ValueError(
                "AvisC reads the whole prompt's attention in one forward: chunked prefill is not supported"
            )
        return super().branch_prompt(state, inputs)

    # ---- the main stream's prompt forward: attention rows of the last prompt token ---------------
    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if state.role.kind != "main" or not self.is_active() or call.query_start + call.q_len != state.prompt_len:
            return None
        return AttentionEdit(reductions=Reductions(head_mean_row=True))

    def setup(self, adapter: Adapter) -> None:
        self.num_layers = adapter.num_layers

    def on_stats(self, state: GuardState, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None:
        row = stats["head_mean_row"]  # keys key_offset .. key_offset + kv_len - 1
        full = row.new_zeros(row.shape[0], state.prompt_len)
        width = min(row.shape[1], state.prompt_len - call.key_offset)
        full[:, call.key_offset : call.key_offset + width] = row[:, :width]
        data = state.data_of(self)
        data.rows[call.layer_idx] = full
        if len(data.rows) == self.num_layers:  # the last layer: choose the blind tokens
            rows = torch.stack([data.rows[layer] for layer in sorted(data.rows)], 1)  # (B, L, P)
            image = state.groups.image.to(rows.device)
            if not bool(image.any(1).all()):
                raise ValueError("AvisC needs an image in every prompt: a row has no image tokens")
            cfg = self.config
            data.blind = torch.stack([blind_tokens(r, i, cfg.layer_gamma, cfg.lamb) for r, i in zip(rows, image)])
            data.rows.clear()

    # ---- the branch's prefill: non-blind image embeddings replaced -------------------------------
    def edit_input_embeds(self, state: GuardState, embeds: torch.Tensor) -> torch.Tensor | None:
        if state.role.kind != "branch" or state.role.owner is not self or not state.in_prefill:
            return None
        blind = state.data_of(self).blind
        if blind is None:
            raise RuntimeError("AvisC's blind tokens are chosen at the prompt's forward, before its branch runs")
        offset = state.position_offset  # the branch prompt's columns are the main prompt's from here
        image = state.groups.image[:, offset:]
        masked = (image & ~blind[:, offset:].to(image.device)).to(embeds.device)[:, -embeds.shape[1] :]
        scheme = self.config.masking_scheme
        if scheme == "zeros":
            fill = torch.zeros_like(embeds)
        elif scheme == "ones":
            fill = torch.ones_like(embeds)
        else:
            fill = torch.randn_like(embeds)
        return torch.where(masked[..., None], fill, embeds)
