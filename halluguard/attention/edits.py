"""What a method may ask of one attention call: edits to apply and reductions to report.

Notation for one layer, batch row b, head h, query row i, key j:
``z[b,h,i,j] = scaling * <q_i, k_j>`` (plus the model's mask), ``a = softmax_j(z)``,
``o[b,h,i] = sum_j a[b,h,i,j] v_j``.

Edits (each optional; tensors are per batch row and broadcast as documented):

* ``key_bias``   ``(B, T)`` or ``(B, H, T)``: ``z += bias`` before the softmax (``-inf`` masks a key).
* ``key_boost``  ``(B, T)`` or ``(B, H, T)``: ``z += boost * |z|`` before the softmax (PAI's
  amplification: ``boost`` is ``alpha`` on the boosted keys and 0 elsewhere).
* ``redistribution``: after the softmax, move a share of the mass on a source key set to a
  target key set, proportionally to the target's current attention; row sums are preserved.
* ``head_scale`` ``(B, H)``: ``o[b,h,i] *= scale[b,h]`` (the per-head output before ``o_proj``).
* ``query_scale`` ``(B, H)``: ``q[b,h,i] *= scale[b,h]`` before the scores; a zero makes the head's
  scores all 0, so it attends uniformly to the keys its mask allows and outputs their mean value
  (DeCoRe's masked retrieval heads, as the official code masks them). It costs nothing extra: the
  model's own attention runs on the scaled queries.

``last_row_only`` restricts all edits of this object to the last query row of the call (at
decode there is one row; at prefill it is the last prompt token).

Reductions (``Reductions``) are reported for the last query row of a call, to the method that
asked, computed on the final (edited) attention: the mass per head on named key groups, the
head-max attention row ``max_h a[b,h,last,j]`` over a window of cache keys and its full sum (or the
rows of the last few queries), the
head-mean row ``mean_h a[b,h,last,j]`` over all keys, and the per-head outputs ``o[b,h,last]``
before any head scale. Asking for reductions never changes
the output.

A call runs in two phases. First every method states its edit and the reductions it wants; the
hook computes the attention of every stream's rows and hands the statistics to the state, which
passes them to the methods (``Method.on_stats``). Then, for edits with ``head_scale_from_stats``,
the state asks the method for the call's head scale (``Method.head_scale_from_stats``): VHR picks
a layer's heads from that layer's own head outputs, in both of its streams, before the next layer
runs. Head scales are applied after both phases, so statistics never see them.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Redistribution:
    """Post-softmax mass transfer from ``source`` keys to ``target`` keys (VAR's E2 edit).

    For each selected (row, head, query):
    ``a'_j = keep * a_j`` for ``j`` in source; the budget ``(1 - keep) * sum_source a`` is added to
    each target key ``k`` (target minus source) in proportion ``a_k / sum_target a``. A query is
    selected when it is eligible (``query_mask``), its mass on ``gate`` keys is at least
    ``gate_min_mass``, the share of that mass on source keys is at most ``gate_max_source_share``,
    and the target holds some mass. The gate is evaluated on the attention before this transfer.

    The key sets may be longer than a call's keys (a method may keep them padded past the cache and
    hand the same tensors to every decode step); keys past the call's count for nothing.
    """

    source: torch.Tensor  # (B, T) or (B, H, T) bool
    target: torch.Tensor  # (B, T) bool
    keep: float  # share of the source mass that stays, in [0, 1]
    gate: torch.Tensor | None = None  # (B, T) bool key group that gates the selection
    gate_min_mass: float = 0.0
    gate_max_source_share: float = 1.0
    query_mask: torch.Tensor | None = None  # (B, Q) bool: eligible query rows of this call

    def cut(self, kv_len: int) -> Redistribution:
        """The same transfer with key sets of exactly ``kv_len`` keys (this one where they are)."""
        sets = (self.source, self.target, self.gate)
        if all(t is None or t.shape[-1] == kv_len for t in sets):
            return self
        source, target, gate = (None if t is None else t[..., :kv_len] for t in sets)
        return dataclasses.replace(self, source=source, target=target, gate=gate)


@dataclasses.dataclass
class Reductions:
    """Statistics of the last query row that a method asks an attention call to report."""

    # name -> (B, T) bool key set (its mass), or float key weights (the weighted sum: 1 / size gives the mean)
    group_masses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    headmax_from_key: int | None = None  # report max_h a over cache keys [headmax_from_key, T) and its full sum
    # the head-max rows of the last ``headmax_rows`` query rows instead of the last one: (B, rows, T - from)
    # and sums (B, rows) (several candidate tokens forwarded side by side as query rows, OPERA)
    headmax_rows: int = 1
    head_outputs: bool = False  # report o[b, h, last] (B, H, D) in float32, before head scales
    head_mean_row: bool = False  # report mean_h a[b, h, last, :] (B, T) in float32
    # report a[b, h, last, :] (B, H, T) in float32 as "last_row" and the call's values (B, H_kv, T, D)
    # as "values": a second output of the last row under other probabilities (ONLY)
    last_row_values: bool = False

    @property
    def needs_probabilities(self) -> bool:
        return (
            bool(self.group_masses) or self.headmax_from_key is not None or self.head_mean_row or self.last_row_values
        )


@dataclasses.dataclass
class AttentionEdit:
    head_scale: torch.Tensor | None = None  # (B, H)
    query_scale: torch.Tensor | None = None  # (B, H)
    key_bias: torch.Tensor | None = None  # (B, T) or (B, H, T)
    key_boost: torch.Tensor | None = None  # (B, T) or (B, H, T)
    redistribution: Redistribution | None = None
    last_row_only: bool = False
    reductions: Reductions | None = None
    head_scale_from_stats: bool = False  # phase two: ask the method for a (B, H) head scale after its stats

    @property
    def scales_only(self) -> bool:
        """True when the edit only scales queries or head outputs by given scales (no score edit,
        redistribution or statistics): the model's own attention on scaled queries, then a product."""
        return not self.changes_probabilities and self.reductions is None and not self.head_scale_from_stats

    @property
    def changes_probabilities(self) -> bool:
        """True when the edit changes attention probabilities beyond what the model's own attention
        computes from (scaled) queries: score edits and redistributions."""
        return self.key_bias is not None or self.key_boost is not None or self.redistribution is not None


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What a method sees of one attention call when it decides its edit."""

    layer_idx: int
    batch: int
    num_heads: int
    q_len: int
    kv_len: int
    key_offset: int  # token position of cache key 0 (non-zero only for a truncated sliding cache)
    query_start: int  # token position of the first query row
    is_prefill: bool  # the queries start inside the prompt
    device: torch.device
