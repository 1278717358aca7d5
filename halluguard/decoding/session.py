"""One guarded call: its streams, and which rows of each forward belong to which stream.

The guard makes a ``Session`` per guarded ``generate`` (or ``Guard.forward``) and drops it after.
The model's forward pre-hook and post-hook report every forward to it:

* before a forward, ``before_forward`` tells each stream's state where the forward starts, opens
  the streams the methods ask for at the first forward (``Method.streams``), and adds the rows of
  probes (first forward) and branches (later forwards) to the forward's inputs; ``routes`` then
  lists, for the attention hook, which rows of the forward belong to which stream's state;
* after it, ``after_forward`` takes the extra rows back out of the output (the caller sees only its
  own rows), hands each branch its next-token logits, drops probe rows from the cache, and after
  the prompt's forward joins each branch's prefilled cache to the main cache as extra rows.

One guarded step then looks like this (a branch riding along; ``N`` main rows)::

    generate ──> forward(N rows) ──pre-hook──> forward(N main + N branch rows)
                                                  │  attention hook, per layer:
                                                  │    routes: rows [0, N) main state, [N, 2N) branch state
                                                  │    phase 1: edits + reductions -> states -> methods
                                                  │    phase 2: head scales chosen from the statistics
                 logits(N) <──post-hook── logits(2N): rows [N, 2N) -> branch.logits
    logits processors (e.g. contrast with branch.logits) -> next token -> cache reorder (every block)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from .. import compat
from ..attention.routing import Route
from ..compat import CACHE, cache_in, cache_of, without_cache
from ..state import GuardState, StreamRole
from .cache import RowGroupsCache
from .side_stream import SideStream
from .streams import Branch, BranchRun, Probe, per_token_inputs, positions_like, split_last_token

if TYPE_CHECKING:
    from torch import nn

    from ..adapters import Adapter
    from ..methods.base import Method


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


class Session:
    """The streams of one guarded call (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        methods: list[Method],
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        *,
        for_generation: bool,
        attention_modules: frozenset[int] = frozenset(),
    ):
        self.model = model
        self._attention_modules = attention_modules  # ids of the text attention modules the hook routes
        self.adapter = adapter
        self.methods = methods
        self.main = GuardState(adapter, methods, input_ids, attention_mask, for_generation=for_generation)
        self._call_rows = input_ids.shape[0] if input_ids is not None else None
        self.routes: list[Route] = [Route(self.main, slice(None))]
        self.branches: dict[Method, BranchRun] = self.main.branches  # the main state gives their logits
        self._apart: list[Route] | None = None  # routes of a forward the session runs itself
        self._extra: list[tuple[Route, Any]] = []  # extra rows of the current forward: (segment, probe or branch)
        self._main_rows = 0
        self._wants_tuple = False
        self._history: torch.Tensor | None = None  # every token fed to each main row (for branches run apart)

    # ---- the routing the attention hook reads (``halluguard.attention.routing``) ------------------
    def covers(self, module: Any) -> bool:
        """Whether ``module`` is one of the guarded model's text attention modules."""
        return id(module) in self._attention_modules

    # ---- the model's forward pre-hook ------------------------------------------------------------
    def before_forward(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Record a forward; returns its inputs with stream rows added, or None to leave them."""
        if self._apart is not None:
            self._feed(self._apart, kwargs)
            self.routes = self._apart
            return None
        ids = kwargs.get("input_ids")
        tokens = ids if ids is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("a guarded forward needs input_ids or inputs_embeds")
        cache = cache_in(kwargs)
        cache_len = cache_length(cache)
        rows, new = tokens.shape[:2]
        self._main_rows = rows
        self._wants_tuple = kwargs.get("return_dict") is False
        self.main.on_forward(ids, kwargs.get("attention_mask"), cache_len, new, rows)
        if self.main.forwards == 1:  # every token the main rows were fed, for branches run apart
            self._history = ids
        elif ids is not None and any(run.side is not None for run in self.branches.values()):
            self._history = torch.cat([self._history, ids], 1)
        self.routes = [Route(self.main, slice(0, rows))]
        self._extra = []
        extra: list[tuple[GuardState, dict, Any]] = []
        if self.main.forwards == 1:
            for spec in self.main.requested_streams(kwargs):
                extra += self._open(spec, kwargs, cache)
        else:
            extra = [(run.state, run.step_rows(kwargs), run) for run in self.branches.values() if run.side is None]
        if not extra:
            return None
        # the extra rows are taken out of a ModelOutput; a caller who asked for a tuple gets one back
        merged, start = dict(kwargs, return_dict=True), rows
        for state, inputs, stream in extra:
            count = inputs["input_ids"].shape[0]
            segment = Route(state, slice(start, start + count))
            state.on_forward(inputs["input_ids"], inputs.get("attention_mask"), cache_len, new, count)
            self.routes.append(segment)
            self._extra.append((segment, stream))
            merged = self._merge_rows(merged, inputs, start)
            start += count
        return merged

    def _open(self, spec: Any, kwargs: dict, cache: Any) -> list[tuple[GuardState, dict, Any]]:
        """Start a stream a method asked for; returns the rows it adds to this forward."""
        if isinstance(spec, Probe):
            role = StreamRole("probe", spec.owner)
            shared = {spec.owner: self.main.data_of(spec.owner)}
            state = GuardState(self.adapter, self.methods, for_generation=False, role=role, shared_data=shared)
            if cache is None or isinstance(cache, DynamicCache):  # rows can be added, then dropped
                return [(state, spec.rows, spec)]
            self._probe_apart(spec, state, kwargs, shared)
            return []
        if isinstance(spec, Branch):
            if spec.owner in self.branches:
                raise ValueError(f"{spec.owner.name} asked for two branches")
            role = StreamRole("branch", spec.owner)
            shared = {
                m: self.main.data_of(m) for m in spec.methods if m.shares_data_with_branches and m in self.methods
            }
            state = GuardState(self.adapter, list(spec.methods), for_generation=False, role=role, shared_data=shared)
            run = BranchRun(spec, state, kwargs)
            self.branches[spec.owner] = run
            if isinstance(cache, RowGroupsCache) and not spec.separate:
                run.pending = True  # prefilled after the prompt's forward, then its cache joins the main one
            else:  # the cache cannot carry extra rows: the branch runs its own forwards
                run.side = SideStream(
                    lambda inputs: self._side_forward(run, inputs),
                    dict(run.prompt),
                    self.main.prompt_len,
                    rows_per_prompt=self._main_rows // (self._call_rows or self._main_rows),
                )
                if isinstance(cache, RowGroupsCache) and self._follow_rows not in cache.followers:
                    cache.followers.append(self._follow_rows)  # beam search's reordering, told by the cache
            return []
        raise TypeError(f"a method's streams() must return Probe or Branch objects, got {spec!r}")

    def _follow_rows(self, index: torch.Tensor) -> None:
        """The main rows were selected (beam search's reordering): the token history follows them."""
        if self._history is not None:
            self._history = self._history.index_select(0, index.to(self._history.device))

    def _probe_apart(self, spec: Probe, state: GuardState, kwargs: dict, shared: dict) -> None:
        """A probe as its own forward before the prompt's (the main rows computed twice)."""
        rows = self._main_rows
        copy = GuardState(self.adapter, self.methods, for_generation=False, shared_data=shared)
        inputs = {k: v for k, v in without_cache(self.main.with_2d_mask(kwargs)).items() if k != "logits_to_keep"}
        inputs = self._merge_rows(dict(inputs, use_cache=False), spec.rows, rows)
        extra = spec.rows["input_ids"].shape[0]
        self._run_apart([Route(copy, slice(0, rows)), Route(state, slice(rows, rows + extra))], inputs)

    def _prefill_branch(self, run: BranchRun) -> DynamicCache:
        """Prefill a branch's prompt apart (after the main prompt's forward); returns its cache."""
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        out = self._branch_prefill(run, dict(run.prompt, **{CACHE: cache}, use_cache=True, logits_to_keep=1))
        run.logits = out.logits[:, -1].float()
        return cache

    def _side_forward(self, run: BranchRun, inputs: dict) -> Any:
        """One forward of a branch that runs apart (its first one is its prefill)."""
        if run.side is not None and run.side.cache is None:
            return self._branch_prefill(run, inputs)
        return self._run_apart([Route(run.state, slice(None))], inputs)

    def _branch_prefill(self, run: BranchRun, inputs: dict) -> Any:
        """The branch's first forward; with ``shares_prompt_cache``, its prompt but the last token runs
        first without the branch's owner (the other methods of the branch act, with the branch's own
        per-call data), then the last token under the branch's state."""
        if not run.spec.shares_prompt_cache:
            return self._run_apart([Route(run.state, slice(None))], inputs)
        width = run.prompt["input_ids"].shape[1]
        if inputs["input_ids"].shape[1] != width:
            raise RuntimeError(f"{run.spec.owner.name}: the branch must start at the first step of generation")
        prefix, last = split_last_token(inputs)
        others = [m for m in run.state.methods if m is not run.spec.owner]
        shared = {m: run.state.data_of(m) for m in others}
        plain = GuardState(self.adapter, others, for_generation=False, role=run.state.role, shared_data=shared)
        plain.position_offset = run.state.position_offset
        plain.set_prompt(inputs["input_ids"], inputs.get("attention_mask"))  # the whole prompt, as the branch's
        out = self._run_apart([Route(plain, slice(None))], prefix)
        last[CACHE] = cache_of(out)  # the cache it was given, or the one it made
        run.state.set_prompt(inputs["input_ids"], inputs.get("attention_mask"))
        return self._run_apart([Route(run.state, slice(None))], last)

    def _run_apart(self, routes: list[Route], inputs: dict) -> Any:
        """Run one forward of the model under ``routes`` (not the main stream), without gradients."""
        previous, self._apart = self._apart, routes
        current = self.routes
        try:
            with torch.no_grad():
                return self.model(**inputs)
        finally:
            self._apart, self.routes = previous, current

    def _feed(self, routes: list[Route], kwargs: dict) -> None:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        cache_len = cache_length(cache_in(kwargs))
        for seg in routes:
            rows = ids[seg.rows]
            seg_mask = mask[seg.rows] if mask is not None and mask.dim() == 2 else None
            seg.stream.on_forward(rows, seg_mask, cache_len, ids.shape[1], rows.shape[0])

    def _merge_rows(self, kwargs: dict, extra: dict, rows: int) -> dict:
        """``kwargs`` (its first ``rows`` rows are the main rows) with the rows of ``extra`` appended."""
        ids = kwargs["input_ids"]
        count, new = extra["input_ids"].shape
        merged = dict(kwargs)
        merged["input_ids"] = torch.cat([ids, extra["input_ids"].to(ids.device)])
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            width = mask.shape[-1] if mask is not None else ids.shape[1] + cache_length(cache_in(kwargs))
            mask = torch.ones(ids.shape[0], width, dtype=torch.long, device=ids.device)
        merged["attention_mask"] = torch.cat([mask, extra["attention_mask"].to(mask)])
        positions = kwargs.get("position_ids")
        if positions is None and not self.adapter.positions_from_ids:
            # what the model does without position ids: the cache positions, for every row
            past = cache_length(cache_in(kwargs))
            positions = torch.arange(past, past + new, device=ids.device)[None].expand(ids.shape[0], -1)
        if positions is not None:
            theirs = positions_like(extra["position_ids"], positions).to(positions)
            merged["position_ids"] = torch.cat([positions.expand(*positions.shape[:-2], rows, -1), theirs], -2)
        # else: the model derives every row's positions from its ids (multimodal rotary positions)
        theirs_per_token = per_token_inputs(extra, count, new)
        for key, value in per_token_inputs(kwargs, ids.shape[0], ids.shape[1]).items():
            other = theirs_per_token.get(key)
            other = other.to(value) if other is not None else value.new_zeros((count, *value.shape[1:]))
            merged[key] = torch.cat([value, other])
        for key in self.adapter.row_image_inputs:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.shape[0] == rows:
                merged[key] = torch.cat([value, value.new_zeros((count, *value.shape[1:]))])
        return merged

    # ---- the model's forward post-hook -----------------------------------------------------------
    def after_forward(self, output: Any) -> Any:
        """Take the stream rows out of ``output``; returns the output the caller sees, or None."""
        if self._apart is not None:
            return None
        rows = self._main_rows
        cache = cache_of(output)
        changed = bool(self._extra)
        if self._extra:
            for segment, stream in self._extra:
                if isinstance(stream, BranchRun):
                    stream.logits = output.logits[segment.rows, -1].float()
            if any(isinstance(stream, Probe) for _, stream in self._extra) and isinstance(cache, DynamicCache):
                compat.select_cache_rows(cache, torch.arange(rows))  # probes only ride the prompt's forward
            for key in ("logits", "hidden_states", "attentions"):
                value = getattr(output, key, None)
                if isinstance(value, torch.Tensor):
                    output[key] = value[:rows]
                elif isinstance(value, tuple):
                    output[key] = tuple(v[:rows] if isinstance(v, torch.Tensor) else v for v in value)
        self._extra = []
        self.routes = [Route(self.main, slice(None))]
        for run in self.branches.values():
            if run.pending:  # after the prompt's forward: prefill apart, then ride along as rows
                cache.add_block(self._prefill_branch(run))
                run.pending = False
                run.state.position_offset = 0  # its keys now sit at the main cache's positions
            elif run.side is not None and run.spec.owner.edits_next_logits:
                run.logits = run.side.next_logits(self._history)
        if self.main.for_generation and any(m.edits_next_logits for m in self.methods):
            output = self._adjust_next_logits(output)
            changed = True
        if self._wants_tuple and changed and not isinstance(output, tuple):
            output = output.to_tuple()
        return output if changed else None

    def _adjust_next_logits(self, output: Any) -> Any:
        """The methods' change of the main rows' next-token logits, in the output itself: ``generate``'s
        processors and warpers then act on the changed logits (the official contrastive samplers'
        order: contrast first, then temperature, top-k, top-p)."""
        logits = output[0] if isinstance(output, tuple) else output.logits
        adjusted = logits.clone()
        adjusted[:, -1] = self.main.adjust_next_logits(logits[:, -1].float()).to(logits.dtype)
        if isinstance(output, tuple):
            return (adjusted, *output[1:])
        output["logits"] = adjusted
        return output

    # ---- the decoder layers' pre-hooks -----------------------------------------------------------
    def on_layer_input(self, layer_idx: int, hidden: torch.Tensor) -> None:
        for segment in self.routes:
            segment.stream.layer_input(layer_idx, hidden[segment.rows])

    def on_input_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """The text backbone's input embeddings, after each stream's methods edited their rows."""
        parts, changed = [], False
        for segment in self.routes:
            rows = embeds[segment.rows]
            edited = segment.stream.edit_input_embeds(rows)
            changed = changed or edited is not rows
            parts.append(edited)
        return torch.cat(parts) if changed else embeds

    # ---- after the call ------------------------------------------------------------------------
    def finish(self, cache: Any) -> None:
        """After the call: the caller's cache holds the main rows only."""
        if isinstance(cache, RowGroupsCache):
            cache.drop_extra_blocks()
            cache.followers.clear()
