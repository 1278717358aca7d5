"""Extra streams a method can ask for, and how each one runs.

A method's ``streams(state, inputs)`` (called at the main stream's first forward with that
forward's inputs) returns any of:

* ``Probe``: rows that ride along the prompt's forward and are dropped after it (VHR's text-only
  copies of the prompts). They share the forward with the main rows, so a method can compare the
  two streams layer by layer; the main rows *are* the real prompt forward, so nothing is computed
  twice. Its ``rows`` are model inputs of the same width as the prompt.
* ``Branch``: a contrast stream that follows the whole generation (PAI's image-free guidance;
  VCD's noised image; AvisC's blind-token view; DeCoRe's masked heads). Its prompt (``prompt``:
  model inputs, one row per main row, left-padded; may be shorter than the main prompt, and may
  carry its own image inputs, used at its first forward only) is prefilled once at its own length;
  its cache then joins the main cache as extra rows, left-padded, and at every step it is fed the
  main row's new token *as extra rows of the main forward*: one forward per step, not two. Its
  next-token logits go to the owner (``GuardState.branch_logits``).

When the cache cannot carry extra rows (a static or caller-supplied cache), a probe runs as a
separate forward before the prompt's, and a branch as a ``SideStream`` (its own forward per step),
with the same results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .layout import drop_padding_columns, positions_like
from .side_stream import SideStream

if TYPE_CHECKING:
    from ..methods.base import Method
    from ..state import GuardState


@dataclasses.dataclass
class Probe:
    """Rows read beside the prompt's forward: ``rows`` (model inputs: input_ids, attention_mask,
    position_ids, ...). With ``apart`` they run, beside a copy of the main rows, as a forward of its
    own before the prompt's, with the owner alone acting (the model as it is, read), so what the owner
    reads there can shape the prompt's own forward (VISTA's steering vector, read from unsteered
    forwards, steers every forward after)."""

    owner: Method
    rows: dict[str, torch.Tensor]
    apart: bool = False


@dataclasses.dataclass
class Branch:
    """A contrast stream: ``prompt`` (model inputs, one row per main row), the ``methods`` acting in it
    (none: the plain model). It is prefilled after the main prompt's forward, so what the methods
    learnt there (VHR's heads, AvisC's blind tokens) can shape it. ``separate`` runs it as its own
    forward per step (the two-forward way) even when its rows could ride along. With
    ``shares_prompt_cache`` the owner acts from the prompt's last token on: the tokens before it are
    run by the branch's other methods alone (DeCoRe's official choice: the masked branch starts from
    the unmasked prompt cache)."""

    owner: Method
    prompt: dict[str, Any]
    methods: Sequence[Method] = ()
    separate: bool = False
    shares_prompt_cache: bool = False


class BranchRun:
    """One branch during a call: its state, its prefill, and its rows at every step."""

    def __init__(self, spec: Branch, state: GuardState, main_inputs: dict[str, Any]):
        self.spec = spec
        self.state = state
        prompt = drop_padding_columns(dict(spec.prompt))
        self.rows, self.width = prompt["input_ids"].shape
        self.main_width = main_inputs["input_ids"].shape[1]
        mask = prompt.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError(
                f"{spec.owner.name}: a branch prompt needs a 2-D attention mask (see GuardState.with_2d_mask)"
            )
        if mask is None:
            mask = torch.ones_like(prompt["input_ids"])
            prompt["attention_mask"] = mask
        if prompt.get("position_ids") is None:
            prompt["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        prompt["position_ids"] = positions_like(prompt["position_ids"], main_inputs.get("position_ids"))
        self.prompt = prompt
        self.state.position_offset = max(0, self.main_width - self.width)  # a longer one runs apart: its own keys
        self.fits_main_rows = self.width <= self.main_width  # it can ride along as rows of the main forwards
        self.logits: torch.Tensor | None = None  # (rows, vocab): next-token logits of the latest step
        self.side: SideStream | None = None  # set when the branch runs as its own forwards
        self.pending = False  # rows mode: to be prefilled after the main prompt's forward
        # the branch rows' mask, left-padded to the main width, and last positions (rows mode)
        self.mask = torch.nn.functional.pad(mask, (max(0, self.main_width - self.width), 0))
        self.last_position = self.prompt["position_ids"][..., -1:]

    def step_rows(self, main: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Inputs of the branch rows for a main decode forward ``main``: the main rows' new tokens."""
        ids = main["input_ids"]
        new = ids.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, new)], 1)
        if new == 1:
            positions = self.last_position = self.last_position + 1
        else:
            steps = torch.arange(1, new + 1, device=ids.device, dtype=self.last_position.dtype)
            positions = self.last_position + steps
            self.last_position = positions[..., -1:]
        return {"input_ids": ids, "attention_mask": self.mask, "position_ids": positions}

    def next_logits(self, input_ids: torch.Tensor | None) -> torch.Tensor:
        if self.side is not None and input_ids is not None:
            return self.side.next_logits(input_ids)
        if self.logits is None or (input_ids is not None and self.logits.shape[0] != input_ids.shape[0]):
            raise RuntimeError(f"{self.spec.owner.name}: the branch rows lost step with generate")
        return self.logits
