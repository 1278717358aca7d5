"""The single attention hook, registered in transformers' attention and mask interfaces.

``wrap`` selects ``"halluguard"`` (``"halluguard_eager"`` for a model loaded with eager attention) as
the attention implementation of the text backbone only. For each call the hook asks the state of
each stream in the forward for edits; which rows belong to which stream is the guarded call's
routing (``routing``: a context variable the call sets, covering its model's modules):

* no state (outside a guarded call) or no edits: the model's own attention runs (SDPA, or eager
  when the model was loaded with eager), so results are unchanged;
* query scales (DeCoRe's uniform heads) scale the queries first, whatever else runs;
* per-head output scales and reductions only: the base attention runs, its output is scaled,
  and (for probability statistics) the last row's probabilities are recomputed (the output is
  untouched); head outputs are reported before the scales are applied;
* edits of the probabilities: the rows that need them (all rows, or only the last one) run
  through the fused operation; other rows keep the base attention. At a decode step whose streams
  each ask a per-row key boost or nothing (PAI's amplified rows beside its image-free rows), every
  row runs in one decode step, the rows that ask nothing with a zero boost.

The fused operation is the Triton kernel (``halluguard.kernels.decode_attention``) for decode-shaped
calls on CUDA, and otherwise the PyTorch path: ``decode_step`` for one query row (a decode step: a
few batched products), ``reference.reference_attention`` for the rest (``dispatch`` decides; the
``HALLUGUARD_KERNEL`` variable forces either). A decode call that only asks for statistics runs the
kernel alone: its output is the attention and its statistics come from the same pass. What is made
from tensors a forward's layers share (the mask's forms, the streams' scales, the edits' conversions)
is made once and kept in the stream's ``derived``.

The mask interface entry is ``sdpa_mask``: a boolean mask (True = attend), or ``None`` when the
mask is plainly causal, so padding, sliding windows and prefix-LM masks all arrive here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import decode_step, dispatch
from .derived import Derived
from .edits import AttentionCall, AttentionEdit
from .reference import attention_probabilities, causal_mask, group_weights, reduce_last_row, reference_attention
from .routing import Route, StreamHandle, routing_for, rows_of

HOOK_NAME = "halluguard"  # unedited calls run SDPA
EAGER_HOOK_NAME = "halluguard_eager"  # unedited calls run the family's eager attention


def _eager_for(module: nn.Module) -> Callable:
    """The eager attention function defined beside this module's class (family specifics kept)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The boolean/None mask of ``sdpa_mask`` as the additive float mask eager attention expects.

    ``sdpa_mask`` returns None only for a plainly causal mask, so None means causal here whatever
    the module's ``is_causal`` says (eager models always receive that causal mask)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if q_len == 1:
            return None
        mask = causal_mask(q_len, kv_len, query.device, first_row=0)[None, None]  # SDPA's is_causal alignment
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def base_attention(
    module: nn.Module, query, key, value, attention_mask, *, base: str, derived: Derived | None = None, **kwargs
):
    """The attention the model would run without the guard: ``(output, weights or None)``. With
    ``derived``, an eager model's additive mask is made once for the calls that share the mask."""
    if base == "eager":
        kwargs.pop("is_causal", None)
        if derived is None:
            mask = _additive_mask(attention_mask, query, key)
        else:
            shape = (query.shape[2], key.shape[2], query.dtype, query.device)
            mask = derived.get(
                "additive mask", (attention_mask,), lambda: _additive_mask(attention_mask, query, key), key=shape
            )
        return _eager_for(module)(module, query, key, value, mask, **kwargs)
    on_cpu = attention_mask is not None and attention_mask.device.type == "cpu"
    if derived is not None and on_cpu and attention_mask.dtype == torch.bool:
        attention_mask = derived.get(
            "sdpa mask", (attention_mask,), lambda: _sdpa_float_mask(attention_mask, query.dtype), key=query.dtype
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _sdpa_float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive mask SDPA makes of it at every call on CPU (0 where True, ``-inf``
    where False, in the query's dtype): the same values, made once for the calls that share the mask
    (on a GPU SDPA's backends treat boolean masks each their own way, so they get the mask as it is)."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), float("-inf"))


def _apply_head_scales(out: torch.Tensor, scales: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """Scale head outputs ``out (B, Q, H, D)`` by each ``(head_scale (B, H), last_row_only)``."""
    for head_scale, last_row_only in scales:
        per_head = head_scale.to(device=out.device, dtype=out.dtype).view(out.shape[0], 1, out.shape[2], 1)
        if last_row_only and out.shape[1] > 1:  # the other rows keep their outputs
            out = torch.cat([out[:, :-1], out[:, -1:] * per_head], dim=1)
        else:
            out = out * per_head
    return out


def _scaled_heads(out: torch.Tensor, edits: list[AttentionEdit]) -> torch.Tensor:
    """``out (B, Q, H, D)`` with the edits' given head scales applied."""
    return _apply_head_scales(out, [(e.head_scale, e.last_row_only) for e in edits if e.head_scale is not None])


def _per_stream(tensor: torch.Tensor, planned: list, apply, field: str, layer: int) -> torch.Tensor:
    """``tensor`` (batch first) with ``apply(rows, edits)`` done to each stream's rows (``planned``: each
    route, its call and its requests), where a stream's edits set ``field``; other rows unchanged.

    ``field`` is ``query_scale`` (``tensor`` the queries ``(B, H, Q, D)``) or ``head_scale`` (the
    outputs ``(B, Q, H, D)``). Where no edit is restricted to the last of several rows, every row's
    scale is one ``(B, H)`` product: made once while the streams' scales are the same tensors (a
    method that keeps its per-layer scales makes it once per generation), then one multiplication."""
    scales = [[getattr(edit, field) for _, edit in requests] for _, _, requests in planned]
    if all(s is None for per_stream in scales for s in per_stream):
        return tensor
    rows_axis = 2 if field == "query_scale" else 1
    last_row_only = any(edit.last_row_only for _, _, requests in planned for _, edit in requests)
    if not last_row_only or tensor.shape[rows_axis] == 1:
        return tensor * _all_rows_scale(tensor, planned, scales, rows_axis, layer)
    if len(planned) == 1:
        return apply(tensor, [edit for _, edit in planned[0][2]])
    return torch.cat([apply(rows_of(tensor, route), [edit for _, edit in requests]) for route, _, requests in planned])


def _all_rows_scale(tensor: torch.Tensor, planned: list, scales: list, rows_axis: int, layer: int) -> torch.Tensor:
    """The streams' per-head scales (each stream's product; 1 where it has none) as one tensor shaped to
    multiply ``tensor``, whose heads are on the axis after ``rows_axis``'s neighbour (see ``_per_stream``)."""
    derived = planned[0][0].stream.derived
    layout = tuple((call.batch, len(s)) for (_, call, _), s in zip(planned, scales))
    sources = tuple(s for per_stream in scales for s in per_stream)

    def make() -> torch.Tensor:
        parts = []
        for (_, call, _), per_stream in zip(planned, scales):
            part = torch.ones(call.batch, call.num_heads, device=tensor.device, dtype=tensor.dtype)
            for scale in per_stream:
                if scale is not None:
                    part = part * scale.to(device=tensor.device, dtype=tensor.dtype)
            parts.append(part)
        heads = torch.cat(parts) if len(parts) > 1 else parts[0]
        return heads[:, :, None, None] if rows_axis == 2 else heads[:, None, :, None]

    return derived.get(f"scales {layer}", sources, make, key=(rows_axis, layout, tensor.dtype, tensor.device))


def _for_rows(edit: AttentionEdit, rows: int) -> AttentionEdit:
    """The score part of an edit for the last ``rows`` query rows (head scales are applied apart)."""
    spec = edit.redistribution
    if spec is not None and spec.query_mask is not None:
        spec = dataclasses.replace(spec, query_mask=spec.query_mask[:, -rows:])
    return dataclasses.replace(edit, head_scale=None, redistribution=spec)


_UNSUPPORTED = ("position_bias", "s_aux", "sinks")


def _plan(routing, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> list:
    """Phase one for every stream of the call: ``(route, its call, its methods' edits)`` per route."""
    planned = []
    for route in routing.routes:
        start, stop, _ = route.rows.indices(query.shape[0])
        call = route.stream.describe_call(module.layer_idx, stop - start, query, key)
        planned.append((route, call, route.stream.edits_for(call)))
    return planned


def _tiled(routes: list[Route], rows: int) -> list[int] | None:
    """The routes' row counts where they cover the call's ``rows`` in order, one after the other (a
    stream's rows and its branch's), else None."""
    ranges = [route.rows.indices(rows) for route in routes]
    ends = [0] + [stop for _, stop, _ in ranges]
    if ends[-1] != rows or not all(r == (e, s, 1) for r, e, s in zip(ranges, ends, ends[1:])):
        return None
    return [stop - start for start, stop, _ in ranges]


def _row_blocks(tensor: torch.Tensor, routes: list[Route]) -> list[torch.Tensor]:
    """Each route's rows of ``tensor`` (batch first): one split where the routes tile its rows
    (``_tiled``), else one slice per route."""
    counts = _tiled(routes, tensor.shape[0]) if len(routes) > 1 else None
    if counts is not None:
        return list(tensor.split(counts))
    return [rows_of(tensor, route) for route in routes]


def _boost_only(edit: AttentionEdit) -> bool:
    """The edit is a per-row key boost ``(B, T)`` and nothing else."""
    boost = edit.key_boost
    others = (edit.key_bias, edit.redistribution, edit.head_scale, edit.query_scale, edit.reductions)
    return boost is not None and boost.dim() == 2 and all(o is None for o in others) and not edit.head_scale_from_stats


def _merged_boost(planned: list, rows: int) -> AttentionEdit | None:
    """One key boost for every row of a call where one stream asks a per-row boost and the others ask
    nothing (PAI's amplified rows beside its image-free rows): zero on the others' rows, which leaves
    their scores as they are (``z + 0 |z|``). Made once per forward. None where the streams ask
    anything else or their rows do not tile the call's."""
    edits = [[edit for _, edit in requests] for _, _, requests in planned]
    boosted = [i for i, asked in enumerate(edits) if asked]
    counts = _tiled([route for route, _, _ in planned], rows)
    if len(boosted) != 1 or counts is None or len(edits[boosted[0]]) > 1 or not _boost_only(edits[boosted[0]][0]):
        return None
    at, boost = boosted[0], edits[boosted[0]][0].key_boost
    if boost.shape[0] != counts[at]:  # (a boost shared by the stream's rows: each stream's own path)
        return None
    before, after = sum(counts[:at]), sum(counts[at + 1 :])

    def make() -> AttentionEdit:  # the zero rows before and after the boosted ones: one pad
        return AttentionEdit(key_boost=torch.nn.functional.pad(boost.to(torch.float32), (0, 0, before, after)))

    return planned[0][0].stream.derived.get("merged boost", (boost,), make, key=(before, after))


def _one_decode_step(module, planned, query, key, value, attention_mask, base, call_kwargs):
    """A float32 decode step (one query row) whose streams each ask a per-row key boost or nothing, as
    one decode step over all its rows (``_merged_boost``): ``(output, None)``, or None where the call
    does not take this path (the kernel's device, another dtype, or other edits)."""
    if len(planned) == 1 or query.shape[2] != 1 or query.dtype != torch.float32 or dispatch.use_kernel(query.device):
        return None  # (one stream's rows take the edited path as they are; a half-precision model's other
        # rows keep its own attention, whose rounding the decode step's float32 products would not share)
    edit = _merged_boost(planned, query.shape[0])
    if edit is None:
        return None
    derived = planned[0][0].stream.derived
    call = _EditedCall(module, query, key, value, attention_mask, base, call_kwargs, [None], derived)
    stepped = call.decode_step([edit])  # (None where the call does not fit the decode step)
    if stepped is None:
        return None
    _check_editable(module, call_kwargs)
    return stepped[0], None


def _hook(base: str) -> Callable:
    """The attention function (transformers' interface signature) of a model whose unedited calls run
    ``base`` attention: ``"sdpa"``, or ``"eager"`` for a model loaded with eager attention."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        call_kwargs = dict(kwargs, dropout=dropout, scaling=scaling, is_causal=is_causal)
        routing = routing_for(module)
        if routing is None:
            return base_attention(module, query, key, value, attention_mask, base=base, **call_kwargs)
        planned = _plan(routing, module, query, key)
        derived = routing.routes[0].stream.derived  # (what is made from the whole call's mask)
        if not any(requests for _, _, requests in planned):  # no stream edits or reads: one call for all rows
            return base_attention(module, query, key, value, attention_mask, base=base, derived=derived, **call_kwargs)
        if all(edit.scales_only for _, _, requests in planned for _, edit in requests):  # one call, scaled rows
            _check_editable(module, call_kwargs)
            query = _per_stream(query, planned, _scale_queries, "query_scale", module.layer_idx)
            out, weights = base_attention(
                module, query, key, value, attention_mask, base=base, derived=derived, **call_kwargs
            )
            return _per_stream(out, planned, _scaled_heads, "head_scale", module.layer_idx), weights
        merged = _one_decode_step(module, planned, query, key, value, attention_mask, base, call_kwargs)
        if merged is not None:
            return merged
        routes = [route for route, _, _ in planned]
        blocks = zip(*(_row_blocks(t, routes) for t in (query, key, value)))
        parts = [
            _StreamPart.run(module, route, call, requests, *qkv, attention_mask, base, call_kwargs)
            for (route, call, requests), qkv in zip(planned, blocks)
        ]
        for part in parts:  # the statistics go to each stream's state, which hands them to its methods
            part.deliver()
        outs = [part.scaled_output() for part in parts]  # phase two: head scales, given or chosen from statistics
        weights = [part.weights for part in parts]
        if len(outs) == 1:
            return outs[0], weights[0]
        return torch.cat(outs), torch.cat(weights) if all(w is not None for w in weights) else None

    return attention


halluguard_attention = _hook("sdpa")
halluguard_eager_attention = _hook("eager")


def hook_name(base: str) -> str:
    """The attention implementation name of the hook whose unedited calls run ``base`` attention."""
    return EAGER_HOOK_NAME if base == "eager" else HOOK_NAME


@dataclasses.dataclass
class _StreamPart:
    """One stream's rows of an attention call: its call, the edits asked, output, weights and statistics."""

    stream: StreamHandle
    call: AttentionCall
    requests: list
    out: torch.Tensor
    weights: torch.Tensor | None
    stats: list

    @classmethod
    def run(
        cls, module, route: Route, call: AttentionCall, requests: list, q, k, v, attention_mask, base,
        call_kwargs,
    ) -> _StreamPart:  # fmt: skip
        """Phase one for the rows of ``route`` (``q``, ``k``, ``v`` its rows of the call's): the stream's
        edits and reductions (``requests``, asked of ``call``), then its attention."""
        shared_mask = attention_mask is None or attention_mask.shape[0] == 1  # one mask for every row
        derived = route.stream.derived
        if shared_mask:
            mask = attention_mask
        else:  # the same slice of the forward's mask for every layer (what is made from it is made once)
            start, stop, _ = route.rows.indices(attention_mask.shape[0])
            mask = derived.get(f"mask rows {start}:{stop}", (attention_mask,), lambda: rows_of(attention_mask, route))
        if requests:
            edits = [edit for _, edit in requests]
            out, weights, stats = _edited(module, q, k, v, mask, edits, base, call_kwargs, derived)
        else:
            (out, weights), stats = base_attention(module, q, k, v, mask, base=base, derived=derived, **call_kwargs), []
        return cls(route.stream, call, requests, out, weights, stats)

    def deliver(self) -> None:
        for (method, _), reported in zip(self.requests, self.stats):
            if reported is not None:
                self.stream.deliver(self.call, method, reported)

    def scaled_output(self) -> torch.Tensor:
        """The output with every head scale applied: given with an edit, or chosen from the statistics."""
        scales = []
        for method, edit in self.requests:
            scale = self.stream.late_head_scale(self.call, method) if edit.head_scale_from_stats else edit.head_scale
            if scale is not None:
                scales.append((scale, edit.last_row_only))
        return _apply_head_scales(self.out, scales)


@dataclasses.dataclass(frozen=True)
class _EditedCall:
    """The inputs of one stream's edited attention, and what every path needs of them."""

    module: nn.Module
    query: torch.Tensor  # (B, H, Q, D), already scaled by the edits' query scales
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    base: str
    kwargs: dict
    reductions: list  # each edit's Reductions or None
    derived: Derived  # the stream's tensors made once for the calls that share them

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def causal(self) -> bool:
        """Eager models receive a causal mask where ``sdpa_mask`` gives None; SDPA uses the module's flag."""
        if self.base == "eager":
            return True
        flag = self.kwargs["is_causal"]
        return getattr(self.module, "is_causal", True) if flag is None else flag

    @property
    def reference(self) -> dict:
        scaling = self.kwargs["scaling"]
        return dict(
            scaling=self.module.scaling if scaling is None else scaling,
            is_causal=self.causal,
            softcap=self.kwargs.get("softcap"),
        )

    def last_rows_mask(self, rows: int) -> torch.Tensor | None:
        if self.mask is None or rows == self.q_len:
            return self.mask
        return self.mask[..., -rows:, :]

    def last_rows(self, rows: int) -> torch.Tensor:
        return self.query if rows == self.q_len else self.query[:, :, -rows:]

    def base_output(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return base_attention(
            self.module, self.query, self.key, self.value, self.mask, base=self.base, derived=self.derived,
            **self.kwargs,
        )  # fmt: skip

    def kernel(self, rows: int, row_edits: list[AttentionEdit]):
        """``(output of the last rows, each request's statistics)`` from the Triton kernel, or None
        when it is not chosen here or the edits do not fit it (``dispatch``)."""
        if self.kwargs.get("output_attentions") or not dispatch.use_kernel(self.query.device):
            return None
        launch = dispatch.fold(
            row_edits, self.reductions, rows=rows, mask=self.last_rows_mask(rows), causal=self.causal,
            kv_len=self.key.shape[2], first_row=self.q_len - rows, device=self.query.device, derived=self.derived,
        )  # fmt: skip
        if launch is None:
            return None
        reference = self.reference
        edited, found = dispatch.run_kernel(
            self.last_rows(rows), self.key, self.value, launch,
            scaling=reference["scaling"], softcap=reference["softcap"], workspace=self.derived,
        )  # fmt: skip
        return edited, dispatch.split_stats(launch, self.reductions, found)

    def decode_step(self, edits: list[AttentionEdit]):
        """``(output, final probabilities (B, H, T) where statistics need them)`` of a one-row call in a
        few batched products (``decode_step``), or None when the call or its edits do not take that path."""
        reference = self.reference
        if self.kwargs.get("output_attentions") or not decode_step.fits(self.query, edits, reference["softcap"]):
            return None
        want_probs = any(r is not None and r.needs_probabilities for r in self.reductions)
        return decode_step.decode_step(
            self.query, self.key, self.value, scaling=reference["scaling"], mask=self.mask, edits=edits,
            derived=self.derived, layer=self.module.layer_idx, want_probs=want_probs,
        )  # fmt: skip

    def last_row_probabilities(self) -> torch.Tensor | None:
        """The unedited probabilities ``(B, H, T)`` of a one-row call in a few products
        (``decode_step.probabilities``), or None when the call does not take that path."""
        reference = self.reference
        if not decode_step.fits(self.query, (), reference["softcap"]):
            return None
        return decode_step.probabilities(
            self.query, self.key, scaling=reference["scaling"], mask=self.mask, derived=self.derived
        )


@dataclasses.dataclass
class _Attended:
    """What one path made of a stream's call: the output (``(B, Q, H, D)``), the weights returned with it,
    and the probabilities statistics are reduced from (the last rows ``(B, H, R, T)``, or the last row
    ``(B, H, T)`` alone), or the kernel's statistics."""

    out: torch.Tensor
    weights: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    last: torch.Tensor | None = None
    kernel_stats: list | None = None

    @property
    def last_row(self) -> torch.Tensor:
        return self.last if self.last is not None else self.probs[:, :, -1]

    def rows(self, count: int) -> torch.Tensor | None:
        """The last ``count`` rows' probabilities (as many as the call has), for statistics of several rows
        (None for one)."""
        if count <= 1:
            return None
        return self.probs[:, :, -count:] if self.probs is not None else self.last[:, :, None]


def _check_editable(module: nn.Module, call_kwargs: dict) -> None:
    present = [name for name in _UNSUPPORTED if call_kwargs.get(name) is not None]
    if present or call_kwargs.get("cache") is not None:
        raise RuntimeError(f"halluguard cannot edit attention that uses {present or ['a paged cache']}")
    if call_kwargs["dropout"] and module.training:
        raise RuntimeError("halluguard edits attention at inference only; call model.eval() first")


def _scale_queries(query: torch.Tensor, edits: list[AttentionEdit]) -> torch.Tensor:
    """``query`` scaled per head by the edits' query scales (first: scores, statistics and the output
    all see these queries)."""
    for edit in edits:
        if edit.query_scale is not None:
            per_head = edit.query_scale.to(device=query.device, dtype=query.dtype).view(*query.shape[:2], 1, 1)
            if edit.last_row_only and query.shape[2] > 1:  # the other rows keep their queries
                query = torch.cat([query[:, :, :-1], query[:, :, -1:] * per_head], dim=2)
            else:
                query = query * per_head
    return query


def _edited(module, query, key, value, attention_mask, edits, base, call_kwargs, derived):
    """Attention of one stream's rows with its edits (head scales aside): ``(out, weights, stats)``,
    where ``stats`` holds each edit's reductions (None where it asked for none)."""
    _check_editable(module, call_kwargs)
    query = _scale_queries(query, edits)
    call = _EditedCall(
        module, query, key, value, attention_mask, base, call_kwargs, [e.reductions for e in edits], derived
    )
    score_edits = [e for e in edits if e.changes_probabilities]
    attended = _with_score_edits(call, score_edits) if score_edits else _with_statistics_only(call)
    return attended.out, attended.weights, _statistics(edits, attended, value, derived)


def _with_score_edits(call: _EditedCall, score_edits: list[AttentionEdit]) -> _Attended:
    """Edited probabilities: the rows that need them (all, or only the last) run through the fused
    operation (kernel, or the reference: in a few products for one row), the other rows keep the base
    attention."""
    reported_rows = max((r.headmax_rows for r in call.reductions if r is not None), default=1)
    q_len = call.q_len
    rows = q_len if any(not e.last_row_only for e in score_edits) or reported_rows > 1 else 1
    row_edits = [_for_rows(e, rows) for e in score_edits]
    ran = call.kernel(rows, row_edits)
    if ran is not None:
        return _joined(call, rows, _Attended(ran[0], kernel_stats=ran[1]))
    stepped = call.decode_step(row_edits)
    if stepped is not None:
        return _Attended(stepped[0], last=stepped[1])
    edited, probs = reference_attention(
        call.last_rows(rows), call.key, call.value, mask=call.last_rows_mask(rows), edits=row_edits,
        first_row=q_len - rows, **call.reference,
    )  # fmt: skip
    weights = probs.to(call.query.dtype) if rows == q_len and call.kwargs.get("output_attentions") else None
    return _joined(call, rows, _Attended(edited, weights, probs=probs))


def _joined(call: _EditedCall, rows: int, edited: _Attended) -> _Attended:
    """``edited`` (its output: the last ``rows`` rows) with the base attention's output for the rows before."""
    if rows < call.q_len:
        out, _ = call.base_output()
        edited.out = torch.cat([out[:, :-rows], edited.out], dim=1)
    return edited


def _with_statistics_only(call: _EditedCall) -> _Attended:
    """Statistics only (or nothing): the model's own output (or, for a decode-shaped call, the kernel's,
    with the statistics from the same pass) and the last rows' probabilities (one row's in a few
    products: ``decode_step.probabilities``)."""
    wanted = [r for r in call.reductions if r is not None and r.needs_probabilities]
    rows = min(max((r.headmax_rows for r in wanted), default=1), call.q_len)
    ran = call.kernel(rows, []) if wanted else None
    if ran is not None:
        edited, kernel_stats = ran
        if rows == call.q_len:  # a decode-shaped call: the kernel's output is the attention
            return _Attended(edited, kernel_stats=kernel_stats)
        out, weights = call.base_output()
        return _Attended(out, weights, kernel_stats=kernel_stats)
    out, weights = call.base_output()
    if not wanted:
        return _Attended(out, weights)
    last = call.last_row_probabilities()
    if last is not None:
        return _Attended(out, weights, last=last)
    probs = attention_probabilities(
        call.last_rows(rows), call.key, mask=call.last_rows_mask(rows), first_row=call.q_len - rows,
        **call.reference,
    )  # fmt: skip
    return _Attended(out, weights, probs=probs)


def _statistics(edits: list[AttentionEdit], attended: _Attended, value: torch.Tensor, derived) -> list:
    """Each edit's reductions: from the kernel's pass, or reduced from the last rows' probabilities;
    head outputs from the output's last row; the values where asked."""
    stats: list[dict[str, torch.Tensor] | None] = []
    for index, edit in enumerate(edits):
        asked, reported = edit.reductions, None
        if asked is not None:
            if attended.kernel_stats is not None:
                reported = attended.kernel_stats[index]
            elif asked.needs_probabilities:
                weights = group_weights(asked.group_masses, derived)
                reported = reduce_last_row(attended.last_row, asked, attended.rows(asked.headmax_rows), weights)
            else:
                reported = {}
            if asked.head_outputs:
                reported["head_outputs"] = attended.out[:, -1].float()
            if asked.last_row_values:
                reported["values"] = value
        stats.append(reported)
    return stats


for _name, _function in ((HOOK_NAME, halluguard_attention), (EAGER_HOOK_NAME, halluguard_eager_attention)):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)
