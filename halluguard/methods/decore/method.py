"""DeCoRe: decoding by contrasting retrieval heads (Gema et al., 2024).

**Heads.** The top ``K`` (``num_retrieval_heads``, 50 in the official configs) of a retrieval-head
file in the official format (one JSON object, ``"layer-head"`` -> per-trial retrieval scores;
heads ranked by their mean score), given as a path or as the loaded object.
``halluguard calibrate retrieval-heads`` computes one for any supported model: ``--protocol
official`` by the official detection (natural-language needles in book text, answered greedily;
``halluguard.calibrate.needle_haystack``), the default ``synthetic`` by teacher-forced copying of
random-token needles (``halluguard.calibrate.retrieval_heads``), which runs for any model.

**Branch.** The same prompt with those heads masked. As the official code does by default
(``masking="uniform"``), a masked head's query is zeroed: its scores are all 0, it attends
uniformly to the keys it may see, and outputs their mean value; ``masking="zero_output"`` is the
paper's description, the head's output set to 0. As in the official code, the branch starts from
the *unmasked* prompt: the prompt's tokens but the last are run by the plain model, and the heads
are masked from the last prompt token on (``masked_prefill=True`` masks the whole prompt).

**Contrast.** With ``p`` and ``p_m`` the next-token distributions of the main rows and of the
branch, and ``a_t`` the entropy (nats) of ``p`` at this step (``alpha_mode="entropy"``; divided by
``ln |V|`` with ``scale_alpha``, capped at ``alpha_cap``) or a constant (``"static"``):

    (1 + a_t) * log p - a_t * log p_m,

with no plausibility cutoff, before ``generate``'s processors (the official code then takes the
argmax: greedy decoding; sampling and beam search work too).

Where the official code and ours differ: it is written for text LLMs at batch size 1, with the
heads masked by a patched attention class (its eager mode also drops the causal mask of a masked
head during a multi-token prefill); here the mask is an attention edit of the branch's rows (the
causal mask kept), every row has its own entropy, and the branch rides along as extra rows of the
main forward (``separate_stream=True``: a second forward per step, the official way). The shared
prompt cache is recomputed rather than copied: the prompt phase costs one more prefill.
"""

from __future__ import annotations

import math

import torch

from ...adapters import Adapter
from ...attention.edits import AttentionCall, AttentionEdit
from ...calibrate.retrieval_heads import check_heads, load_retrieval_heads
from ...decoding import contrast, cutoff, entropy
from ...state import GuardState
from ..contrastive import ContrastMethod
from .config import CAPABILITIES, DeCoReConfig


class DeCoRe(ContrastMethod):
    """Decoding by contrasting retrieval heads (see the module docstring)."""

    config_cls = DeCoReConfig
    capabilities = CAPABILITIES

    def setup(self, adapter: Adapter) -> None:
        cfg = self.config
        if cfg.retrieval_heads is None:
            if self.is_active():
                raise ValueError(
                    "DeCoRe needs retrieval heads: DeCoReConfig(retrieval_heads='heads.json'), a file in the official "
                    "format; `halluguard calibrate retrieval-heads --model ... --out heads.json` makes one"
                )
            heads: list[tuple[int, int]] = []
        elif cfg.num_retrieval_heads == 0:  # nothing masked: the branch is the plain model
            heads = []
        else:
            heads = load_retrieval_heads(cfg.retrieval_heads, cfg.num_retrieval_heads)
            check_heads(heads, adapter.num_layers, adapter.num_heads)
        self.kept_heads: dict[int, torch.Tensor] = {}  # layer -> (H,) float: 0 at its masked heads, 1 elsewhere
        for layer, head in heads:
            self.kept_heads.setdefault(layer, torch.ones(adapter.num_heads, device=adapter.model.device))[head] = 0.0

    def at_neutral_strength(self) -> bool:
        cfg = self.config
        return cfg.alpha_mode == "static" and cfg.alpha == 0

    def control_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """DeCoRe's control row: the base log-probabilities (it has no plausibility cutoff)."""
        return cutoff(logits, 0.0, space="log_probs")

    def shares_prompt_cache(self) -> bool:
        return not self.config.masked_prefill

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        if state.role.kind != "branch" or state.role.owner is not self:
            return None
        kept = self.kept_heads.get(call.layer_idx)  # (H,): 0 at the masked heads, 1 elsewhere
        if kept is None:
            return None
        # the same tensor at every step, so the hook makes the call's row scales once
        name = f"decore heads {call.layer_idx} {call.batch} {call.device}"
        scale = state.derived.get(name, (kept,), lambda: kept.to(call.device)[None].expand(call.batch, -1))
        if self.config.masking == "uniform":
            return AttentionEdit(query_scale=scale)
        return AttentionEdit(head_scale=scale)

    def weight(self, logits: torch.Tensor) -> torch.Tensor | float:
        """``a_t``: per row ``(rows, 1)``, or the static constant."""
        cfg = self.config
        if cfg.alpha_mode == "static":
            return cfg.alpha
        alpha = entropy(logits)
        if cfg.scale_alpha:
            alpha = alpha / math.log(logits.shape[-1])
        if cfg.alpha_cap is not None:
            alpha = alpha.clamp_max(cfg.alpha_cap)
        return alpha

    def combine(self, state: GuardState, logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        alpha = self.weight(logits)
        return contrast(logits, other, 1.0 + alpha, alpha, space="log_probs")
