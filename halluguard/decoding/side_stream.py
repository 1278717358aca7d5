"""A second stream that follows ``generate`` token by token, with its own prompt and KV cache.

A branch stream (see ``streams``) normally rides along the main forward as extra rows. When the
cache cannot carry extra rows (a static or caller-supplied cache), or to measure the two-forward
way side by side, the branch runs as a ``SideStream``: it is fed the same generated tokens as each
main row, one per step, in a forward of its own, and returns its next-token logits.

Rows are matched to the stream's previous rows by their generated tokens within each prompt's
group of rows, so beam search's reordering and generate's row expansion (beams,
``num_return_sequences``) are followed by reordering the stream's cache, not by recomputing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..compat import CACHE, cache_of
from .layout import is_per_token, row_dim


class SideStream:
    """``next_logits(input_ids)``: the stream's next-token logits ``(rows, vocab)`` for each main row.

    ``forward(inputs)`` runs the model on a dict of inputs (the guard runs it under the stream's own
    state). ``prompt`` holds the stream's prompt for the ``B`` prompts of the call: ``input_ids``,
    ``attention_mask`` (left padding), ``position_ids`` (2-D) and any other per-token inputs
    (token types), extended with their last column for generated tokens as ``generate`` does;
    ``main_prompt_len`` is the main stream's prompt length (generated tokens start there);
    ``rows_per_prompt`` says how many consecutive prompt rows belong to one original prompt (rows
    ``generate`` already expanded for beams or sequences: a row may take over another of its group).
    """

    def __init__(
        self,
        forward: Callable[[dict], Any],
        prompt: dict[str, torch.Tensor],
        main_prompt_len: int,
        rows_per_prompt: int = 1,
    ):
        self.forward = forward
        self.rows_per_prompt = rows_per_prompt  # prompt rows already expanded by generate (beams, sequences)
        self.prompt = prompt
        self.main_prompt_len = main_prompt_len
        self.cache = None
        self.fed: torch.Tensor | None = None  # generated tokens fed so far, per row
        self.logits: torch.Tensor | None = None  # the next-token logits after them
        self.rows: dict[str, torch.Tensor] = {}  # per-row mask / positions / token types so far
        self.group = 1  # main rows per prompt (beams, sequences)

    def next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.main_prompt_len :]
        if self.fed is not None and self.fed.shape == generated.shape and torch.equal(self.fed, generated):
            return self.logits  # asked again at the same step (the owner, then a logits processor)
        if self.cache is None:
            inputs = self._start(generated)
        else:
            self._follow(generated[:, :-1])
            inputs = self._extend(generated[:, -1:])
        inputs.update({CACHE: self.cache}, use_cache=True, logits_to_keep=1)
        out = self.forward(inputs)
        self.cache = cache_of(out)
        self.fed = generated
        self.logits = out.logits[:, -1].float()
        return self.logits

    # ---- internals ------------------------------------------------------------------------------
    def _start(self, generated: torch.Tensor) -> dict:
        """Prompt rows expanded to the main rows (and any tokens generated before the first call); the
        prompt's other inputs (image tensors, encoder outputs) go to this first forward only."""
        rows = generated.shape[0]
        batch = self.prompt["input_ids"].shape[0]
        if rows % batch:
            raise ValueError(f"{rows} generated rows do not extend the {batch} prompts of the side stream")
        expand = rows // batch
        self.group = expand * self.rows_per_prompt
        per_row = {k: v for k, v in self.prompt.items() if k != "input_ids" and is_per_token(k, v)}
        self.rows = {k: v.repeat_interleave(expand, row_dim(k, v)) for k, v in per_row.items()}
        first_only = {k: v for k, v in self.prompt.items() if k != "input_ids" and k not in per_row}
        inputs = self._extend(generated, already=self.prompt["input_ids"].repeat_interleave(expand, 0))
        return {**first_only, **inputs}

    def _extend(self, new: torch.Tensor, already: torch.Tensor | None = None) -> dict:
        """Inputs feeding ``new`` tokens (after ``already`` prompt tokens at the first call)."""
        n = new.shape[1]
        ids = new if already is None else torch.cat([already, new], dim=1)
        mask = torch.cat([self.rows["attention_mask"], self.rows["attention_mask"].new_ones(new.shape[0], n)], 1)
        last = self.rows["position_ids"][..., -1:]
        steps = torch.arange(1, n + 1, device=last.device, dtype=last.dtype)
        positions = torch.cat([self.rows["position_ids"], last + steps], -1)
        extras = {
            k: torch.cat([v, v[:, -1:].expand(-1, n)], 1)
            for k, v in self.rows.items()
            if k not in ("attention_mask", "position_ids")
        }
        width = ids.shape[1]
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions[..., -width:],
            **{k: v[:, -width:] for k, v in extras.items()},
        }
        self.rows.update(attention_mask=mask, position_ids=positions, **extras)
        return inputs

    def _follow(self, history: torch.Tensor) -> None:
        """Reorder the stream's rows so that row ``i`` holds the row whose fed tokens are ``history[i]``."""
        if self.fed is not None and self.fed.shape == history.shape and torch.equal(self.fed, history):
            return
        if self.fed is None or self.fed.shape != history.shape:
            raise RuntimeError(
                "the side stream lost step with generate (tokens were added or removed other than one per step)"
            )
        rows = history.shape[0]
        same = (history[:, None, :] == self.fed[None, :, :]).all(-1)  # (new row, old row)
        group = torch.arange(rows, device=history.device) // self.group
        same &= group[:, None] == group[None, :]
        if not bool(same.any(1).all()):
            raise RuntimeError("a generated row matches none of the side stream's rows")
        index = same.to(torch.int8).argmax(1)
        self.cache.reorder_cache(index)
        self.rows = {k: v.index_select(row_dim(k, v), index) for k, v in self.rows.items()}


class TokenHistory:
    """Every token fed to each main row so far, ``(rows, tokens)``: what a side stream is matched
    against, kept in the order of the rows as beam search reorders them."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None

    def record(self, ids: torch.Tensor | None, *, first: bool) -> None:
        """The tokens of a forward of the main rows (its first: the prompt)."""
        if first:
            self.tokens = ids
        elif ids is not None:
            self.tokens = torch.cat([self.tokens, ids], 1)

    def follow(self, index: torch.Tensor) -> None:
        """The main rows were selected (beam search's reordering): the history follows them."""
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index.to(self.tokens.device))
