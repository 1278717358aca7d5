"""Lookback Lens: hallucination detection from lookback ratios (Chuang et al., EMNLP 2024).

Per generated token ``t``, layer ``l`` and head ``h``, from the attention of the query that
produces ``t`` (the last query row of the forward: the prompt's last token for the first one):

    LR[t, l, h] = A_ctx / (A_ctx + A_new),
    A_ctx = mean_{j in context} a[l, h, t, j],   A_new = mean_{j generated} a[l, h, t, j]

(means, not sums: the official definition). Context: every prompt token, image included
(``context="prompt"``, the default), or only the image tokens (``"image"``) or only the text
(``"text"``); "new" keys are the generated tokens. At the first token there are none, so
``A_new = 0`` and ``LR = 1`` wherever the context holds any attention (the official text-only setting
counts a response prefix such as "#Answer:" as new; in a chat prompt that prefix is part of the
prompt). A span's feature is the mean of ``LR`` over its tokens, flattened layer-major
(``L0H0, L0H1, ...``) as in the official classifiers.

A logistic classifier (``LookbackClassifier``: weights over the ``L * H`` features and a bias, label 1
= faithful, the official convention) rates spans. Detection (``mode="detect"``) leaves generation
untouched and gives, per sequence, every token's features and, with a classifier, each token's
hallucination probability ``1 - p_faithful`` of the window of ``window`` tokens ending at it (the
official sliding-window setting, 8) and the spans of consecutive flagged tokens (probability above
``threshold``). After ``generate`` the results are ``guard.results["lookback"]``.

The statistics come from the attention hook (the mass of each head on the context and generated
keys at each step, two floats per head per layer); no attention map is kept and
``output_attentions`` is never used. Beam search is refused: its rows reorder, and a token's
features would follow the row, not the token.

Classifier-guided decoding (``mode="guide"``, the official mitigation; it needs a classifier): per
chunk of ``chunk_size`` tokens (8), ``num_candidates`` (8) continuations are sampled from the shared
prefix as rows of one batch, each is scored by ``p_faithful`` of its tokens' mean ratios, and the
best one is kept with its cache (``halluguard.methods.lookback.guided``). Batches work: every prompt
keeps its own best.

Where the official code and the paper differ, the code is followed: its ``generate`` calls the
guided decoding without the sampling warpers and without the caller's length, so every chunk is
sampled at temperature 1 with no top-p and no top-k, and an answer runs to 256 new tokens. Those are
the defaults here (the sampling unless the call sets its own, the length when the call sets none);
``temperature=0.9, top_p=0.95`` gives the sampling the paper and its run commands state.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ...adapters import Adapter
from ...attention.edits import AttentionCall, AttentionEdit, Reductions
from ...calibrate import made_for
from ...state import GuardState
from ..base import Method
from .classifier import LookbackClassifier
from .config import CAPABILITIES, LookbackConfig


def window_means(features: torch.Tensor, window: int) -> torch.Tensor:
    """``(T, ...)`` -> ``(T, ...)``: the mean of each token's window of ``window`` tokens ending at it
    (shorter at the start)."""
    sums = features.float().cumsum(0)
    lagged = torch.zeros_like(sums)
    if len(sums) > window:
        lagged[window:] = sums[:-window]
    counts = torch.arange(1, len(sums) + 1, device=sums.device).clamp(max=window).float()
    return (sums - lagged) / counts.view((-1,) + (1,) * (features.dim() - 1))


def flagged_spans(flags: list[bool]) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` runs of True."""
    spans, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


@dataclasses.dataclass
class Detection:
    """Lookback Lens' reading of one generated sequence (tokens after the prompt)."""

    features: torch.Tensor  # (T, L, H): every token's lookback ratios
    hallucination: torch.Tensor | None = None  # (T,): 1 - p_faithful of the window ending at each token
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # flagged token runs


@dataclasses.dataclass
class LookbackCall:
    """Per call: this forward's context and generated masses by layer, and every step's ratios ``(rows, L, H)``."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = dataclasses.field(default_factory=dict)  # masses
    steps: list[torch.Tensor] = dataclasses.field(default_factory=list)
    path: torch.Tensor | None = None  # guided decoding: the kept tokens' ratios (rows, T, L, H)
    groups: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # this forward's key groups
    groups_key: tuple | None = None
    generated: int = 1  # this forward's generated keys (at least 1): ``A_new`` is their sum over this
    kept: tuple | None = None  # (rows' groups, context weights, generated indicator) of a full cache


class Lookback(Method):
    """Lookback Lens detection and guided decoding (see the module docstring). ``on_chunk`` is
    called after every chunk of guided decoding with its candidates, their scores and the kept one."""

    config_cls = LookbackConfig
    capabilities = CAPABILITIES

    def __init__(self, config: LookbackConfig | None = None, on_chunk: Any = None):
        super().__init__(config)
        self.on_chunk = on_chunk

    def setup(self, adapter: Adapter) -> None:
        cfg = self.config
        if cfg.mode == "guide" and cfg.classifier is None:
            raise ValueError(
                "Lookback Lens' guided decoding (mode='guide') needs a classifier: "
                "LookbackConfig(classifier='lb.json'), from `halluguard calibrate lookback`"
            )
        self.num_layers, self.num_heads = adapter.num_layers, adapter.num_heads
        self.classifier = None
        if cfg.classifier is not None:
            self.classifier = LookbackClassifier.load(cfg.classifier)
            self.classifier.check(self.num_layers, self.num_heads, cfg.context)
            if not made_for(self.classifier.model, adapter.model):
                warnings.warn(
                    f"the lookback classifier {cfg.classifier} was trained for {self.classifier.model!r}, and this "
                    f"model is {getattr(adapter.model, 'name_or_path', '') or 'unnamed'!r}: they share the layout "
                    f"({self.num_layers} layers x {self.num_heads} heads), but its scores fit only the model it "
                    "was trained on",
                    UserWarning,
                    stacklevel=2,
                )

    def last_ratios(self, state: GuardState) -> torch.Tensor:
        """``(rows, L, H)``: the lookback ratios of the latest forward's query (the one producing each
        row's next token)."""
        return state.data_of(self).steps[-1]

    def keep_path(self, state: GuardState, path: torch.Tensor | None) -> None:
        """Guided decoding's kept tokens' ratios ``(rows, T, L, H)``: the features of its detections."""
        state.data_of(self).path = path

    def chunk_scores(self, means: torch.Tensor) -> torch.Tensor:
        """``p_faithful`` of candidate chunks from the mean ratios of their tokens ``(rows, L, H)``."""
        return self.classifier.faithful_probability(means)

    def generate_loop(self, state: GuardState) -> Any:
        if self.config.mode != "guide":
            return None
        import functools

        from .guided import guided_search

        return functools.partial(guided_search, method=self, state=state)

    def new_call_state(self) -> LookbackCall:
        return LookbackCall()

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if state.role.kind != "main":
            return None
        data = state.data_of(self)
        key = (call.kv_len, call.key_offset, state.seen_tokens, call.batch)
        if data.groups_key != key:  # once per forward, shared by its layers
            data.groups = self._groups(state, call)
            end = min(state.seen_tokens, call.key_offset + call.kv_len)
            data.generated = max(end - max(state.groups.prompt_len, call.key_offset), 1)
            data.groups_key = key
        return AttentionEdit(reductions=Reductions(group_masses=data.groups))

    def _groups(self, state: GuardState, call: AttentionCall) -> dict[str, torch.Tensor]:
        """The forward's key groups: the context's keys weighted by one over their count (so that its mass
        is ``A_ctx``, a mean) and the generated keys' indicator (their mass a sum, ``A_new`` times their
        count). While the cache holds every token from the first, both are slices of columns made once
        for twice the keys (keys past the tokens seen have no probability), so that a decode step makes
        nothing new but two slices."""
        if call.key_offset:  # a sliding window: its groups from the masks of this forward's window
            return self._weighted(state.group_masks(call))
        data = state.data_of(self)
        kept = data.kept
        fits = kept is not None and kept[1].shape[1] >= call.kv_len and kept[1].device == call.device
        if not fits or kept[0] is not state.groups:
            capacity = 2 * max(call.kv_len, state.groups.prompt_len)
            masks = state.groups.masks(capacity, 0, capacity)  # every position filled: none past the prompt is
            weighted = self._weighted({name: m.to(call.device) for name, m in masks.items()})  # context
            data.kept = (state.groups, weighted["context"], weighted["generated"])
        _, context, generated = data.kept
        return {"context": context[:, : call.kv_len], "generated": generated[:, : call.kv_len]}

    def _weighted(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = masks["context" if self.config.context == "prompt" else self.config.context].float()
        weights = context / context.sum(-1, keepdim=True).clamp_min(1)
        return {"context": weights, "generated": masks["generated"].float()}

    def on_stats(self, state: GuardState, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None:
        """Keep the layer's masses; at the last layer the forward's ratios, for all layers at once:
        ``r = A_ctx / (A_ctx + A_new)`` per (row, layer, head), 0.5 where both are 0."""
        data = state.data_of(self)
        # a mean, a sum and its count of keys (layers of a sliding window count fewer generated keys)
        data.layers[call.layer_idx] = (stats["mass/context"], stats["mass/generated"], data.generated)
        if call.layer_idx == self.num_layers - 1:
            masses = [data.layers[i] for i in range(self.num_layers)]
            a_ctx = torch.stack([m[0] for m in masses], 1).float()  # (rows, L, H)
            generated = torch.stack([m[1] for m in masses], 1).float()
            counts = {m[2] for m in masses}
            if len(counts) == 1:
                total = torch.add(a_ctx, generated, alpha=1.0 / counts.pop())
            else:
                per_layer = torch.tensor([m[2] for m in masses], dtype=torch.float32, device=generated.device)
                total = a_ctx + generated / per_layer[:, None]
            data.steps.append(torch.nan_to_num(a_ctx / total, nan=0.5))  # 0 / 0 where both are 0; no host sync
            data.layers = {}

    def call_result(self, state: GuardState, sequences: torch.Tensor) -> list[Detection]:
        """Per generated sequence: its tokens' features and, with a classifier, its scores."""
        data = state.data_of(self)
        new = sequences.shape[1] - state.caller_prompt_len
        if data.path is not None:  # guided decoding: the kept candidates' ratios
            features = data.path[:, :new].cpu()
        elif data.steps and new > 0:
            features = torch.stack(data.steps[:new], 1).cpu()  # (rows, T, L, H): the forward producing each token
        else:
            return []
        results = []
        for row in features:
            detection = Detection(row)
            if self.classifier is not None:
                means = window_means(row, self.config.window)
                detection.hallucination = 1 - self.classifier.faithful_probability(means)
                detection.spans = flagged_spans((detection.hallucination > self.config.threshold).tolist())
            results.append(detection)
        return results


__all__ = ["Detection", "Lookback", "flagged_spans", "window_means"]
