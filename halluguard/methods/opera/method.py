"""OPERA: over-trust penalty and retrospection-allocation in beam search (Huang et al., CVPR 2024).

OPERA reads one layer's attention (default: the last; in models with sliding-window layers, the
last full-attention layer), reduced by the maximum over heads and each
row re-normalised to sum to 1 over all keys: ``w_ij`` is the weight generated token ``i`` puts on
generated token ``j``. At each step of a beam search with ``B`` beams:

1. **Candidates**: the top ``N`` raw logits of each beam (``num_attn_candidates``).
2. **Look-ahead**: each candidate is forwarded once, giving its own row ``w_c`` (its weights on the
   response so far and on itself).
3. **Over-trust score**: over the response window (every generated token and the candidate), per
   column ``j``, ``psi_j = 1e-7 * prod_{i >= j} sigma * w_ij`` (the column's product down the rows,
   diagonal included, ``sigma = scale_factor``), ``phi = max_j psi_j`` and ``loc = argmax_j psi_j``.
   A column whose later rows all lean on it (a "summary" token the model over-trusts) scores high.
   The products are kept in log space per beam (``log prod`` over the beam's history rows, one add
   per step), so nothing overflows and no attention map is stored.
4. **Penalty**: candidate scores ``l_c - alpha * phi_c`` (``alpha = penalty_weights``); every other
   token is excluded, so the beam search ranks the ``N`` candidates of each beam by
   ``log_softmax`` over them, then runs as transformers' beam search (length penalty, EOS,
   stopping criteria).
5. **Retrospection**: each beam's most frequent ``loc`` over its candidates joins a per-beam-slot
   history; ``s`` is the most frequent of these over the beams. When ``s >= 10`` and every beam's
   history holds ``s`` more than ``r = threshold`` times, the search rolls back to position
   ``s + 1`` (or ``s`` once ``s + 1`` has been rolled back to ``N`` times; no rollback once both
   have), restores the search as it stood there, and decodes that position again from the full
   vocabulary without the penalty, never choosing again a (beam, token) pair chosen there before.

**Paper vs official code.** The code (followed by default) differs from the paper in three ways:
for the first ``image_bonus_tokens = 10`` response tokens the penalty is replaced by a bonus, the
candidate's attention mass on the image (``l_c + alpha * sum_{j in image} w_cj``; 0 gives the
paper's penalty from the first token; kept on by default because the published numbers were made
with it); the local window is the whole response (the paper's window ``k``; ``window_size`` here
only bounds the history kept for rollbacks, as in the code); the rollback compares with a strict
``> r`` (the paper says ``>= r``). The per-position rollback limit reuses ``N``, as the code does.
After a rollback the history keeps the re-decided position's entry, as the code's pops leave it.

**Ranking finished beams.** The official search runs transformers 4.29's beam scorer, which
normalises a finished hypothesis by its whole length, ``score / (P' + g) ** length_penalty``, with
``P'`` the prompt as its LLaVA passes it (the text tokens and one placeholder per image, not the
image's hundreds of tokens) and ``g`` the generated tokens without the end token; the current
releases divide by the generated tokens alone, which favours shorter hypotheses less. The 4.29
ranking (and its stopping heuristic) is the default, ``length_normalisation="official"``;
``"transformers"`` ranks as the installed release (the neutral setting: then OPERA without its
penalty and rollback is ``generate``'s beam search exactly). With the 4.29 ranking and no penalty
or rollback, OPERA is the beam-search baseline as the official runs rank it.

**Where the code's numerics are not followed.** The official code scores in float16 (``psi`` over
about 65504 becomes ``inf``) and sets non-candidates to ``-999``, so a beam whose candidates all
score below ``-999`` picks an arbitrary token; here ``psi`` is computed in float32 from log space
(capped at float32's maximum) and non-candidates are excluded. ``penalty_weights = 0`` with
``retrospection = False`` and ``length_normalisation="transformers"`` is transformers' beam search
exactly (no candidate restriction, no look-ahead, no statistics).

**Cost.** The candidates' look-ahead is one forward per step: each beam's row takes its ``N``
candidates as ``N`` new tokens at the same position under a tree mask (each sees the beam's tokens
and itself, not its siblings), so the beams' cache is read once and never copied per candidate; the
winners' cache slots and logits become the next step's, so nothing is recomputed. The attention
statistics come from the hook on the chosen layer (one head-max row per candidate); no
``output_attentions``. A rollback crops the cache to the longest prefix the restored beams share
and forwards the rest of their response once (never the prompt). ``num_beams = 1`` (greedy OPERA,
disabled in the official code) and sampling are refused.

**Batches.** The prompt's forward runs once for the whole (left-padded) batch, then each sample's
beams are searched on their own rows of the cache, one sample after another, so a rollback in one
never touches another. The search itself is ``halluguard.methods.opera.search``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from ...adapters import Adapter
from ...attention.edits import AttentionCall, AttentionEdit, Reductions
from ...state import GuardState
from ..base import Method
from .config import CAPABILITIES, OPERAConfig
from .scores import column_log_products, over_trust


@dataclasses.dataclass
class OPERACall:
    """Per call: whether the next forwards report the chosen layer's head-max row, from which key,
    and the last report."""

    collect: bool = False
    from_key: int = 0
    query_rows: int = 1
    rows: torch.Tensor | None = None  # (B, keys - from_key) or (B, n, ...): max over heads of the attention
    sums: torch.Tensor | None = None  # (B,) or (B, n): the full rows' sums (for the re-normalisation)


class OPERA(Method):
    """OPERA (see the module docstring). ``on_step`` is called after every step of the search with
    a dict describing it (for inspection and tests)."""

    config_cls = OPERAConfig
    capabilities = CAPABILITIES

    def __init__(self, config: OPERAConfig | None = None, on_step: Callable[[dict[str, Any]], Any] | None = None):
        super().__init__(config)
        self.on_step = on_step

    @property
    def neutral(self) -> bool:
        """Plain beam search: no penalty and no rollback."""
        return self.config.penalty_weights == 0 and not self.config.retrospection

    def last_reading(self, state: GuardState) -> dict[str, Any]:
        """The latest report of the chosen layer: ``rows`` (head-max attention from key ``from_key``)
        and ``sums`` (the full rows' sums), for a step's description."""
        data = state.data_of(self)
        return {"rows": data.rows, "sums": data.sums, "from_key": data.from_key}

    def setup(self, adapter: Adapter) -> None:
        layers, sliding = adapter.num_layers, adapter.sliding_layers()
        layer = self.config.layer
        if layer is None:  # the last layer, or the last one that sees the whole response (Gemma 3)
            layer = max(i for i in range(layers) if i not in sliding) if len(sliding) < layers else -1
        if not -layers <= layer < layers:
            raise ValueError(f"OPERA layer {layer} is outside the model's {layers} layers")
        if layer % layers in sliding:
            raise ValueError(
                f"OPERA layer {layer} attends within a sliding window, so it does not see the whole response; "
                f"pick a full-attention layer (this model's: {sorted(set(range(layers)) - sliding)})"
            )
        self.layer = layer % layers

    def new_call_state(self) -> OPERACall:
        return OPERACall()

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        data = state.data_of(self)
        if not data.collect or call.layer_idx != self.layer or call.is_prefill:
            return None
        return AttentionEdit(reductions=Reductions(headmax_from_key=data.from_key, headmax_rows=data.query_rows))

    def on_stats(self, state: GuardState, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None:
        data = state.data_of(self)
        data.rows, data.sums = stats["headmax_row"].float(), stats["headmax_sum"].float()

    def collect(self, state: GuardState, step: int | None, rows: int = 1) -> None:
        """Report the chosen layer's head-max rows of the last ``rows`` query rows at the next forwards
        (``step``: the response position of the tokens they feed), or stop (``None``)."""
        data = state.data_of(self)
        data.collect, data.query_rows = step is not None, rows
        bonus = step is not None and step + 1 <= self.config.image_bonus_tokens
        data.from_key = 0 if bonus else state.prompt_len  # the image keys sit in the prompt
        data.rows = data.sums = None

    def penalties(
        self, state: GuardState, history: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the tokens of the last forward, at response position ``step``: ``(penalty, loc,
        columns (R, step + 1))``, one row per token, from the reported head-max rows and their parent
        beams' column histories ``history (R, step)``.

        The last forward fed one token per beam (rows ``(B, keys)``) or ``N`` candidates per beam
        side by side (rows ``(B, N, keys)``: the response so far, then the ``N`` candidates' slots,
        of which candidate ``n`` sees only its own)."""
        data = state.data_of(self)
        rows, sums = data.rows, data.sums
        if rows.dim() == 2:
            rows, sums = rows[:, None], sums[:, None]
        count = rows.shape[1]
        weights = rows / sums[..., None].clamp_min(torch.finfo(torch.float32).tiny)  # (B, n, keys - from_key)
        prompt = state.prompt_len - data.from_key  # where the response starts in the reported rows
        end = weights.shape[-1] - count  # where the fed tokens' own slots start
        own = weights[..., end:].diagonal(dim1=1, dim2=2)  # (B, n): each token on itself
        window = torch.cat([weights[..., prompt:end], own[..., None]], -1).flatten(0, 1)  # (B * n, step + 1)
        columns = column_log_products(history, window, self.config.scale_factor)
        phi, loc = over_trust(columns)
        if step + 1 <= self.config.image_bonus_tokens:
            image = state.groups.image.to(weights.device)[:, None, :prompt]
            penalty = -(weights[..., :prompt] * image).sum(-1).flatten()
        else:
            penalty = phi
        return penalty, loc, columns

    def generate_loop(self, state: GuardState) -> Callable[..., Any]:
        from .search import opera_search

        return functools.partial(opera_search, method=self, state=state)
