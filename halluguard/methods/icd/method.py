"""ICD: instruction contrastive decoding (Wang et al., ACL Findings 2024; official code p1k0pan/ICD).

A contrast branch sees the same image and prompt with a disturbance instruction before it (``prefix``,
a role such as "You are a confused objects detector to provide a fuzzy overview or impression of the
image."), which the paper finds raises hallucination; its next-token logits ``l'`` are contrasted
away from the main ones ``l``::

    (1 + alpha) * l - alpha * l',   with tokens where l < max(l) + ln(beta) set to -inf,

on raw logits before ``generate``'s processors and warpers, as the official LLaVA sampler does
(``icd_utils/icd_sample_llava.py``: alpha 1, beta 0.1 in the scripts; sampling at temperature 1,
top-p 1, which a guarded ``generate`` given none of ``do_sample`` and ``top_k`` follows).

Where the prefix goes: the official LLaVA script makes it the branch's system prompt
(``"{prefix} USER: <image>\\n{question} ASSISTANT:"``, the main prompt keeping LLaVA's own system
prompt). Here the prefix's tokens go at the start of each row's prompt, after its BOS: on a prompt
without a system prompt (LLaVA-1.5's chat template) that is the official branch prompt to the token;
with a system prompt the prefix comes before it instead of replacing it. The official scripts run
each of five prefixes as its own experiment (``config.PREFIXES``); the default is the "confused"
detector, the role the paper describes.

Cost: one forward per token. The disturbed prompt is longer than the main one by the prefix, so the
guard pads the main prompt's forward on the left by as many masked columns
(``Method.widens_main_prompt_by``): the branch's rows then share the main forward's key layout and
ride along every step as extra rows, like VCD's. ``separate_stream=True`` runs the branch as its own
forward per step (the official way), prefilled once, with a cache of its own. Position ids given with
the prompt (M-RoPE's included) are shifted past the prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from ...adapters import Adapter
from ...decoding.layout import prefixed_rows
from ...state import GuardState
from ..contrastive import ContrastMethod, same_prompt
from .config import CAPABILITIES, ICDConfig


class ICD(ContrastMethod):
    """Contrast with a disturbance instruction before the prompt (see the module docstring)."""

    config_cls = ICDConfig
    capabilities = CAPABILITIES

    def setup(self, adapter: Adapter) -> None:
        tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
        self.bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        if self.bos is None:
            self.bos = getattr(adapter.text_config, "bos_token_id", None)
        if self.config.prefix_ids is not None:
            self.prefix_ids = torch.tensor(self.config.prefix_ids)
            return
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(
                "ICD encodes its disturbance instruction with the processor's tokenizer: "
                "wrap(model, processor, 'icd'), or give the instruction as prefix_ids"
            )
        self.prefix_ids = torch.tensor(tokenizer(self.config.prefix, add_special_tokens=False)["input_ids"])
        if self.prefix_ids.numel() == 0:
            raise ValueError(f"the tokenizer encodes ICD's prefix {self.config.prefix!r} as no tokens")

    def widens_main_prompt_by(self) -> int:
        return self.prefix_ids.numel() if self.is_active() and not self.runs_apart() else 0

    def branch_prompt(self, state: GuardState, inputs: dict[str, Any]) -> dict[str, Any]:
        prompt = same_prompt(state, inputs)
        ids, mask = prompt["input_ids"], prompt.get("attention_mask")
        first = ids.gather(1, (mask.long().argmax(1) if mask is not None else torch.zeros_like(ids[:, 0]))[:, None])
        after_bos = (first[:, 0] == self.bos) if self.bos is not None else torch.zeros_like(ids[:, 0], dtype=torch.bool)
        return prefixed_rows(prompt, self.prefix_ids.to(ids.device), after_bos)
