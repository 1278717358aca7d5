"""What the contrastive methods (VCD, AvisC, DeCoRe) share: a contrast branch, and where its
logits meet the main ones.

Each method asks for one ``Branch`` (``halluguard.decoding.streams``): the same prompt as the main
rows, changed in the one way the method is about (a noised image, a blind-token view, masked
retrieval heads). It is prefilled after the main prompt's forward and then rides along every main
forward as extra rows, so a step costs one forward, not two (``separate_stream=True`` runs it as
its own forward per step, the official way, to compare).

The attention-level methods of the same guard (VHR, VAR, PAI's amplification: those that set
``acts_in_branches``) act in the branch too, so both sides of the contrast differ only in what the
contrast is about; VHR reinforces the heads it chose in the main stream.

The contrast is applied to the main rows' next-token logits as the model returns them
(``Method.next_token_logits``), before ``generate``'s processors and warpers: the order of the
official samplers (contrast, then repetition penalty, temperature, top-k, top-p, then sampling).
"""

from __future__ import annotations

from typing import Any

import torch

from ..compat import without_cache
from ..decoding import Branch, contrast, cutoff
from ..state import GuardState
from .base import Method

# forward arguments that belong to one forward, not to a prompt (the cache aside: compat.without_cache)
_NOT_PROMPT = (
    "use_cache",
    "cache_position",
    "logits_to_keep",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "inputs_embeds",
)


def same_prompt(state: GuardState, inputs: dict[str, Any]) -> dict[str, Any]:
    """The main prompt's forward inputs (ids, 2-D mask, positions, image inputs) for a branch."""
    if inputs.get("input_ids") is None:
        raise ValueError("a contrast branch needs the prompt's input_ids (inputs_embeds alone cannot be copied)")
    given = without_cache(state.with_2d_mask(inputs))
    prompt = {k: v for k, v in given.items() if k not in _NOT_PROMPT and v is not None}
    if state.past_len:
        raise ValueError("a contrast branch starts with the prompt: a call from a filled cache is not supported")
    return prompt


class ContrastMethod(Method):
    """A method with one contrast branch; subclasses build the branch and combine the logits."""

    def at_neutral_strength(self) -> bool:
        """Whether the contrast weighs nothing (VCD's and AvisC's ``alpha = 0``)."""
        return self.config.alpha == 0

    def is_active(self) -> bool:
        """Whether the branch runs (a method at its neutral strength, or its control row, runs none)."""
        return not self.at_neutral_strength() and not self.config.control

    def branch_methods(self, state: GuardState) -> tuple[Method, ...]:
        """The method itself (for the edits that make the branch what it is: AvisC's embeddings,
        DeCoRe's heads), then the guard's methods that act in contrast branches."""
        return (self, *(m for m in state.methods if m is not self and m.capabilities.acts_in_branches))

    def branch_prompt(self, state: GuardState, inputs: dict[str, Any]) -> dict[str, Any]:
        """The branch's prompt: the main prompt (VCD replaces its image)."""
        return same_prompt(state, inputs)

    def runs_apart(self) -> bool:
        """Whether the branch runs as its own forward per step rather than as extra rows."""
        return self.config.separate_stream

    def shares_prompt_cache(self) -> bool:
        """Whether the branch starts from the unmasked prompt (DeCoRe's official choice)."""
        return False

    def streams(self, state: GuardState, inputs: dict[str, Any]) -> list[Branch]:
        if not self.is_active():
            return []
        state.require_left_padding(self.name)
        branch = Branch(
            self,
            self.branch_prompt(state, inputs),
            self.branch_methods(state),
            separate=self.runs_apart(),
            shares_prompt_cache=self.shares_prompt_cache(),
        )
        return [branch]

    def combine(self, state: GuardState, logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The contrasted logits from the main ``logits`` and the branch's ``other`` (``(rows, vocab)``):
        VCD's and AvisC's ``(1 + alpha) l - alpha l_other`` on logits under the cutoff ``beta``, the
        branch's rows that hold a NaN replaced by the main ones (as the official samplers do)."""
        cfg = self.config
        other = nan_rows_to(other, logits)
        return contrast(logits, other, 1.0 + cfg.alpha, cfg.alpha, space="logits", beta=cfg.beta)

    def control_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The control row (``control=True``): everything the method does but the contrast, here the
        logits under the plausibility cutoff ``beta``. A gain of the method over its control is the
        contrast's; one of the control over plain decoding is the cutoff's (Yin et al., "The Mirage of
        Performance Gains", 2025)."""
        return cutoff(logits, self.config.beta)

    def next_token_logits(self, state: GuardState, logits: torch.Tensor) -> torch.Tensor:
        if self.config.control:
            return self.control_logits(logits)
        if not self.is_active():
            return logits
        return self.combine(state, logits, state.branch_logits(self).to(logits.device))


def nan_rows_to(other: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``other`` with its rows that hold a NaN replaced by ``fallback``'s (the official samplers fall
    back to the main logits when the contrast branch's are NaN)."""
    bad = torch.isnan(other).any(-1, keepdim=True)
    return torch.where(bad, fallback, other) if bool(bad.any()) else other
