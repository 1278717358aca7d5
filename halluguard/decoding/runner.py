"""Forwards a guarded call runs itself, apart from ``generate``'s own.

Three kinds, each under routes of its own (``halluguard.attention.routing``):

* a probe as its own forward before the prompt's, when the cache cannot carry extra rows (the
  main rows computed twice: once with the probe, once as ``generate`` runs them);
* a branch's prefill, once after the main prompt's forward (its cache then joins the main cache as
  extra rows), or its first forward when it runs apart;
* every forward of a branch that runs apart (a ``SideStream``).

These forwards go through the model's hooks too: while one runs, ``apart`` holds its routes, and the
session lets it through (it only tells each route's state where the forward starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from ..attention.routing import Route
from ..compat import CACHE, cache_in, cache_of, without_cache
from ..state import GuardState
from .layout import merge_rows, split_last_token
from .streams import BranchRun, Probe

if TYPE_CHECKING:
    from torch import nn

    from ..adapters import Adapter
    from ..methods.base import Method


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


class StreamRunner:
    """Runs the forwards of a call's extra streams that do not ride along ``generate``'s forwards."""

    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method]):
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.apart: list[Route] | None = None  # the routes of the forward this runner is running

    def run(self, routes: list[Route], inputs: dict) -> Any:
        """One forward of the model under ``routes``, without gradients."""
        previous, self.apart = self.apart, routes
        try:
            with torch.no_grad():
                return self.model(**inputs)
        finally:
            self.apart = previous

    def feed(self, kwargs: dict) -> None:
        """Tell each state of the running forward's routes where the forward starts."""
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        cache_len = cache_length(cache_in(kwargs))
        for route in self.apart:
            rows = ids[route.rows]
            route_mask = mask[route.rows] if mask is not None and mask.dim() == 2 else None
            route.stream.on_forward(rows, route_mask, cache_len, ids.shape[1], rows.shape[0])

    def probe(
        self, spec: Probe, state: GuardState, main: GuardState, kwargs: dict, shared: dict, methods: list[Method]
    ) -> None:
        """A probe as its own forward before the prompt's: the main rows (under a copy of the main state
        with ``methods`` acting, sharing the probe owner's data) and the probe's rows."""
        rows = kwargs["input_ids"].shape[0]
        copy = GuardState(self.adapter, methods, for_generation=False, shared_data=shared)
        inputs = dict(without_cache(main.with_2d_mask(kwargs)), use_cache=False, logits_to_keep=1)  # logits unread
        inputs = merge_rows(
            inputs,
            spec.rows,
            0,  # the probe's forward runs without a cache
            positions_from_ids=self.adapter.positions_from_ids,
            row_image_inputs=self.adapter.row_image_inputs,
        )
        extra = spec.rows["input_ids"].shape[0]
        self.run([Route(copy, slice(0, rows)), Route(state, slice(rows, rows + extra))], inputs)

    def prefill(self, run: BranchRun) -> DynamicCache:
        """Prefill a branch's prompt apart (after the main prompt's forward); returns its cache, and
        keeps its next-token logits on the branch."""
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        out = self.first_forward(run, dict(run.prompt, **{CACHE: cache}, use_cache=True, logits_to_keep=1))
        run.logits = out.logits[:, -1].float()
        return cache

    def side_forward(self, run: BranchRun, inputs: dict) -> Any:
        """One forward of a branch that runs apart (its first one is its prefill)."""
        if run.side is not None and run.side.cache is None:
            return self.first_forward(run, inputs)
        return self.run([Route(run.state, slice(None))], inputs)

    def first_forward(self, run: BranchRun, inputs: dict) -> Any:
        """The branch's first forward; with ``shares_prompt_cache``, its prompt but the last token runs
        first without the branch's owner (the other methods of the branch act, with the branch's own
        per-call data), then the last token under the branch's state (DeCoRe's official choice)."""
        if not run.spec.shares_prompt_cache:
            return self.run([Route(run.state, slice(None))], inputs)
        if inputs["input_ids"].shape[1] != run.prompt["input_ids"].shape[1]:
            raise RuntimeError(f"{run.spec.owner.name}: the branch must start at the first step of generation")
        prefix, last = split_last_token(inputs)
        others = [m for m in run.state.methods if m is not run.spec.owner]
        shared = {m: run.state.data_of(m) for m in others}
        plain = GuardState(self.adapter, others, for_generation=False, role=run.state.role, shared_data=shared)
        plain.position_offset = run.state.position_offset
        plain.set_prompt(inputs["input_ids"], inputs.get("attention_mask"))  # the whole prompt, as the branch's
        out = self.run([Route(plain, slice(None))], prefix)
        last[CACHE] = cache_of(out)  # the cache it was given, or the one it made
        run.state.set_prompt(inputs["input_ids"], inputs.get("attention_mask"))
        return self.run([Route(run.state, slice(None))], last)
