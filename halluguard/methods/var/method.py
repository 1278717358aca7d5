"""VAR: visual attention redistribution from attention sinks (Kang et al., ICLR 2025).

Sink tokens ``S_l = {j : max_{d in D_sink} |x_j[d]| / RMS(x_j) > tau}`` are read from the residual
stream at prefill. For image-centric (head, query) pairs (image mass >= ``summ`` and visual-sink
share of it <= ``rho``) the post-softmax mass on all sinks is scaled by ``p`` and the freed mass
``(1 - p) * M_S`` goes to non-sink image tokens in proportion to their attention. As in the
official code, a layer is edited (for a row) only if at least one of its sinks is an image token:
a layer whose only sinks are text tokens (BOS) is left alone.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from ...adapters import Adapter
from ...attention import decode_step
from ...attention.edits import AttentionCall, AttentionEdit, Redistribution
from ...calibrate import made_for
from ...state import GuardState
from ..base import Method
from .config import CAPABILITIES, VARConfig


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What identifies a text backbone for its sink dimensions: a different backbone of the same width
    and depth (LLaMA-3-8B against LLaMA-2-7B) differs in vocabulary and key/value heads."""

    model_type: str
    hidden_size: int
    layers: int
    kv_heads: int
    vocab_sizes: tuple[int, ...]  # the base vocabulary and the sizes LVLM checkpoints extend it to

    def matches(self, adapter: Adapter) -> bool:
        tc = adapter.text_config
        return (
            tc.model_type == self.model_type
            and int(tc.hidden_size) == self.hidden_size
            and adapter.num_layers == self.layers
            and adapter.num_kv_heads == self.kv_heads
            and int(tc.vocab_size) in self.vocab_sizes
        )


# Massive-activation dimensions of known text backbones.
KNOWN_SINK_DIMS: tuple[tuple[Backbone, tuple[int, ...]], ...] = (
    # LLaMA-2-7B / Vicuna-7B (LLaVA-1.5-7B, LLaVA-NeXT-7B): official code
    (Backbone("llama", 4096, 32, 32, (32000, 32064)), (1415, 2533)),
    # LLaMA-2-13B / Vicuna-13B (LLaVA-1.5-13B, LLaVA-NeXT-13B): official code
    (Backbone("llama", 5120, 40, 40, (32000, 32064)), (2100, 4743)),
    # Qwen2-VL-7B: paper
    (Backbone("qwen2_vl_text", 3584, 28, 4, (152064,)), (458, 2570)),
)


def load_sink_dims(path: str, model: torch.nn.Module) -> tuple[int, ...]:
    """The sink dimensions of a file ``halluguard calibrate sink-dims --out`` wrote: whole numbers, at
    least one; a file recorded for another model warns with both names."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read sink dimensions from {path}: {err}") from None
    dims = record.get("sink_dims") if isinstance(record, dict) else None
    if not isinstance(dims, list) or not dims or any(not isinstance(d, int) or isinstance(d, bool) for d in dims):
        raise ValueError(f"{path} holds no sink dimensions (a non-empty list of whole numbers under 'sink_dims')")
    label = str(record.get("model", ""))
    if not made_for(label, model):
        warnings.warn(
            f"the sink dimensions in {path} were found for {label!r}, and this model is "
            f"{getattr(model, 'name_or_path', '') or 'unnamed'!r}: they fit only the model they were found for",
            UserWarning,
            stacklevel=3,
        )
    return tuple(dims)


def known_sink_dims(adapter: Adapter) -> tuple[int, ...] | None:
    return next((dims for backbone, dims in KNOWN_SINK_DIMS if backbone.matches(adapter)), None)


@dataclasses.dataclass
class VARCall:
    """VAR's data for one stream of a call."""

    sinks: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (B, P) bool
    image_end: torch.Tensor | None = None  # (B,) position after each row's last image token
    decode: dict[int, VARLayer] = dataclasses.field(default_factory=dict)  # layer -> its decode-time sets


@dataclasses.dataclass
class VARLayer:
    """A layer's key sets once the prompt is in (its sinks no longer change), padded past the cache
    length so that each decode step takes views instead of building them."""

    rows: torch.Tensor | None  # the state's row index these were made for (None: the prompt's rows)
    visual: torch.Tensor  # (B,) the row has a visual sink in this layer
    any_visual: bool
    source: torch.Tensor  # (B, capacity) sinks
    target: torch.Tensor  # (B, capacity) image tokens that are not sinks
    image: torch.Tensor  # (B, capacity) image tokens
    # the decode steps' edit, the same for every step while the cache keeps every token: its sets are
    # the padded ones (an edit's key sets may be longer than a call's keys) and a row without a visual
    # sink has no target (so it is never selected: every decode query comes after the images)
    decode_edit: AttentionEdit | None = None


class VAR(Method):
    """Redistribute attention from sink tokens to image tokens in image-centric heads.

    Prefill: the residual stream entering each layer ``l >= first_layer`` gives that layer's sink
    set ``S_l`` (padding excluded); it is kept for the whole generation (generated tokens are never
    sinks). Every forward: each (head, query) whose image mass is at least ``summ`` and whose
    visual-sink share of it is at most ``rho`` keeps ``keep`` of its mass on all sinks (visual and
    text) and gives the rest to the non-sink image tokens, proportionally. At the prefill only
    queries after each row's last image token are eligible (they and their KV entries change);
    at decode the new token is.
    """

    config_cls = VARConfig
    capabilities = CAPABILITIES
    reads_layer_inputs = True

    def setup(self, adapter: Adapter) -> None:
        cfg = self.config
        if isinstance(cfg.sink_dims, str):
            dims = load_sink_dims(cfg.sink_dims, adapter.model)
        else:
            dims = cfg.sink_dims if cfg.sink_dims is not None else known_sink_dims(adapter)
        if dims is None:
            tc = adapter.text_config
            raise ValueError(
                f"VAR needs the massive-activation (sink) dimensions of this text backbone "
                f"({tc.model_type}, hidden {tc.hidden_size}, {adapter.num_layers} layers), which are not "
                "in the table: find them with `halluguard calibrate sink-dims --model ...` and pass "
                "VARConfig(sink_dims=...)"
            )
        hidden = int(adapter.text_config.hidden_size)
        if not dims or max(dims) >= hidden:
            raise ValueError(f"VARConfig.sink_dims {dims} must be indices below the hidden size {hidden}")
        self.dims = torch.tensor(dims)
        self.kv_heads = adapter.num_kv_heads
        last = adapter.num_layers - 1 if cfg.skip_last_layer else adapter.num_layers
        self.layers = range(cfg.first_layer, last)
        if not self.layers:
            raise ValueError(
                f"VAR edits layers [{cfg.first_layer}, {last}): none in this {adapter.num_layers}-layer model"
            )

    def new_call_state(self) -> VARCall:
        return VARCall()

    def on_prompt(self, state: GuardState) -> None:
        ends = [max(end for _, end in spans) if spans else 0 for spans in state.image_spans]
        state.data_of(self).image_end = torch.tensor(ends, device=state.groups.image.device)

    def _key_sets(self, state: GuardState, sinks: torch.Tensor, end: int, *, for_decode: bool) -> VARLayer:
        """The layer's sinks and non-sink image tokens for the current rows, padded to at least ``end``
        keys (twice that for the decode steps, so that the next steps reuse them)."""
        sinks = state.rows_of(sinks)
        image = state.groups.image
        visual = (sinks & image).any(-1)
        capacity = max(end, image.shape[1]) * (2 if for_decode else 1)
        source = torch.nn.functional.pad(sinks, (0, capacity - sinks.shape[1]))
        target = torch.nn.functional.pad(image & ~sinks, (0, capacity - image.shape[1]))
        image = torch.nn.functional.pad(image, (0, capacity - image.shape[1]))
        return VARLayer(state.row_index, visual, bool(visual.any()), source, target, image)

    def _prepare_decode(self, state: GuardState, sinks: torch.Tensor, call: AttentionCall) -> None:
        """At the prompt's last forward, once the layer's sinks are final: the sets and the edit of its
        decode steps, and what the decode step derives from them, so that no decode step makes them."""
        sets = self._key_sets(state, sinks, call.key_offset + call.kv_len, for_decode=True)
        state.data_of(self).decode[call.layer_idx] = sets
        if sets.any_visual:
            sets.decode_edit = self._decode_edit(sets)
            decode_step.prepare(
                sets.decode_edit, state.derived, layer=call.layer_idx, batch=call.batch,
                num_heads=call.num_heads, kv_heads=self.kv_heads, device=call.device,
            )  # fmt: skip

    def _decode_edit(self, sets: VARLayer) -> AttentionEdit:
        cfg = self.config
        spec = Redistribution(
            source=sets.source,
            target=sets.target & sets.visual[:, None].to(sets.target.device),
            keep=cfg.keep,
            gate=sets.image,
            gate_min_mass=cfg.summ,
            gate_max_source_share=cfg.rho,
        )
        return AttentionEdit(redistribution=spec)

    def sink_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """``max_{d in D_sink} |x_d| / RMS(x)`` per token of ``hidden (B, T, D)``."""
        x = hidden.float()
        rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        return (x[..., self.dims.to(x.device)].abs() / rms).amax(-1)

    def on_layer_input(self, state: GuardState, layer_idx: int, hidden: torch.Tensor) -> None:
        if layer_idx not in self.layers or not state.in_prefill:
            return
        groups = state.groups
        sinks = state.data_of(self).sinks.setdefault(layer_idx, torch.zeros_like(groups.valid))
        start = state.past_len
        stop = min(start + hidden.shape[1], groups.prompt_len)
        found = self.sink_scores(hidden[:, : stop - start]) > self.config.tau
        sinks[:, start:stop] = found & groups.valid[:, start:stop]

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if call.layer_idx not in self.layers:
            return None
        data = state.data_of(self)
        sinks = data.sinks.get(call.layer_idx)
        if sinks is None:
            return None
        end = call.key_offset + call.kv_len
        if state.in_prefill:
            sets = self._key_sets(state, sinks, end, for_decode=False)
            if call.key_offset == 0 and state.seen_tokens >= state.groups.prompt_len:  # the sinks are final
                self._prepare_decode(state, sinks, call)
        else:
            sets = data.decode.get(call.layer_idx)
            if sets is None or sets.rows is not state.row_index or sets.source.shape[1] < end:
                sets = data.decode[call.layer_idx] = self._key_sets(state, sinks, end, for_decode=True)
        # the official rule: a row's layer is edited only if one of its sinks is an image token
        if not sets.any_visual:
            return None
        if not state.in_prefill and call.key_offset == 0:
            if sets.decode_edit is None:
                sets.decode_edit = self._decode_edit(sets)
            return sets.decode_edit
        window = slice(call.key_offset, end)
        queries = call.query_start + torch.arange(call.q_len, device=call.device)
        eligible = (queries[None, :] >= state.rows_of(data.image_end)[:, None]) & sets.visual[:, None].to(call.device)
        cfg = self.config
        return AttentionEdit(
            redistribution=Redistribution(
                source=sets.source[:, window],
                target=sets.target[:, window],
                keep=cfg.keep,
                gate=state.group_masks(call)["image"],
                gate_min_mass=cfg.summ,
                gate_max_source_share=cfg.rho,
                query_mask=eligible,
            )
        )
