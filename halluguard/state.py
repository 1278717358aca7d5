"""Per-``generate`` state: key groups of every row, the step counter, and reported statistics.

A fresh ``GuardState`` is made for every guarded ``generate`` call and dropped when it returns, so
nothing stays on the model between calls. The model's forward pre-hook feeds it the ids of each
forward (the prompt at prefill, the new tokens at decode); the attention hook asks it for the
edits of each call and hands back the reductions.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from .attention.edits import AttentionCall, AttentionEdit

if TYPE_CHECKING:
    from .adapters import Adapter
    from .methods.base import Method


@dataclasses.dataclass
class KeyGroups:
    """Named key sets of every batch row, over absolute token positions.

    ``image``     the image (visual) tokens of the prompt;
    ``context``   every real (non-padding) prompt token, image included (Lookback Lens' context);
    ``text``      prompt tokens that are not image tokens;
    ``generated`` every token after the prompt.
    Padding belongs to no group.
    """

    image: torch.Tensor      # (B, P) bool
    valid: torch.Tensor      # (B, P) bool: not padding
    prompt_len: int

    def masks(self, kv_len: int, key_offset: int = 0) -> dict[str, torch.Tensor]:
        """Boolean masks ``(B, kv_len)`` of each group for keys at positions ``key_offset + j``."""
        total = key_offset + kv_len
        extra = max(total - self.prompt_len, 0)
        pad = self.image.new_zeros(self.image.shape[0], extra)
        image = torch.cat([self.image, pad], 1)[:, key_offset:total]
        context = torch.cat([self.valid, pad], 1)[:, key_offset:total]
        generated = torch.cat([torch.zeros_like(self.valid), ~pad], 1)[:, key_offset:total]
        return {"image": image, "context": context, "text": context & ~image, "generated": generated}


class GuardState:
    """Everything one guarded ``generate`` call knows and collects."""

    def __init__(self, adapter: "Adapter", methods: "list[Method]"):
        self.adapter = adapter
        self.methods = methods
        self.groups: KeyGroups | None = None
        self.image_spans: list[list[tuple[int, int]]] | None = None
        self.seen_tokens = 0         # tokens fed so far, prompt included
        self.step = -1               # -1 before the prefill, 0 at the prefill, then +1 per decode forward
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self._mask_cache: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None

    # ---- fed by the model's forward pre-hook --------------------------------------------------
    def on_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   num_new: int) -> None:
        """Record one forward: the prompt (first call) or ``num_new`` more tokens."""
        if self.step < 0:
            if input_ids is None:
                raise ValueError("a guarded generate needs input_ids (image positions are read from them); "
                                 "inputs_embeds alone are not supported")
            if attention_mask is not None and attention_mask.dim() == 2 and bool((attention_mask[:, -1] == 0).any()):
                raise ValueError("right-padded batch: generation needs left padding "
                                 "(set processor.tokenizer.padding_side = 'left')")
            valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 \
                else torch.ones_like(input_ids, dtype=torch.bool)
            image = self.adapter.image_mask(input_ids) & valid
            self.groups = KeyGroups(image=image, valid=valid, prompt_len=input_ids.shape[1])
            self.image_spans = self.adapter.image_spans(torch.where(valid, input_ids, -1))
            self.seen_tokens = input_ids.shape[1]
            self.step = 0
            for method in self.methods:
                method.on_prompt(self, input_ids)
        else:
            self.seen_tokens += num_new
            self.step += 1
        self.stats = {}

    # ---- used by the attention hook -------------------------------------------------------------
    def group_masks(self, kv_len: int, key_offset: int) -> dict[str, torch.Tensor]:
        """Key-group masks for a call, computed once per step and shared by all layers."""
        if self.groups is None:
            raise RuntimeError("key groups are not known before the prefill")
        key = (kv_len, key_offset)
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, self.groups.masks(kv_len, key_offset))
        return self._mask_cache[1]

    def describe_call(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> AttentionCall:
        q_len, kv_len = query.shape[2], key.shape[2]
        # A sliding-window cache may hold fewer keys than tokens seen: key j is then token offset + j.
        offset = max(self.seen_tokens - kv_len, 0)
        return AttentionCall(layer_idx=layer_idx, batch=query.shape[0], num_heads=query.shape[1],
                             q_len=q_len, kv_len=kv_len, key_offset=offset,
                             is_prefill=self.step == 0, device=query.device)

    def edits_for(self, call: AttentionCall) -> list[AttentionEdit]:
        if self.step < 0:
            return []
        edits = []
        for method in self.methods:
            edit = method.attention_edit(self, call)
            if edit is not None:
                edits.append(edit)
        return edits

    def record(self, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None:
        if stats:
            self.stats.setdefault(call.layer_idx, {}).update(stats)
            for method in self.methods:
                method.on_stats(self, call, stats)
