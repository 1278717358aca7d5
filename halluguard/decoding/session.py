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

A branch prompt longer than the main one (ICD's instruction before it) still rides along: the
prompt's forward pads the main rows on the left by the difference (masked columns, chosen from
``Method.widens_main_prompt_by``), every later forward's mask gets the same columns, and the caller
sees none of them (outputs and the returned cache are cut back).

How rows join and leave a forward is ``layout``; the forwards the call runs itself (a probe or a
branch apart, a branch's prefill) are ``runner``'s.

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
from ..attention.routing import Route, rows_of
from ..compat import cache_in, cache_of
from ..state import GuardState, StreamRole
from .cache import RowGroupsCache
from .layout import left_padded, merge_rows, take_rows, without_leading_columns
from .runner import StreamRunner, cache_length
from .side_stream import SideStream, TokenHistory
from .streams import Branch, BranchRun, Probe

if TYPE_CHECKING:
    from torch import nn

    from ..adapters import Adapter
    from ..methods.base import Method


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The streams' rows back in one tensor (one stream: its rows as they are)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Session:
    """The streams of one guarded call (see the module docstring); the routing the attention hook
    reads while the call runs."""

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
        self.adapter = adapter
        self.methods = methods
        self.main = GuardState(adapter, methods, input_ids, attention_mask, for_generation=for_generation)
        self.runner = StreamRunner(model, adapter, methods)
        self.history = TokenHistory()  # every token fed to each main row (for branches run apart)
        self.branches: dict[Method, BranchRun] = self.main.branches  # the main state gives their logits
        self._attention_modules = attention_modules  # ids of the text attention modules the hook routes
        self._call_rows = input_ids.shape[0] if input_ids is not None else None
        self._routes: list[Route] = [Route(self.main, slice(None))]
        self._extra: list[tuple[Route, Any]] = []  # extra rows of the current forward: (route, probe or branch)
        self._main_rows = 0
        self._wants_tuple = False
        self._forward_rows = 0  # rows of the forward in progress, extra streams' included
        self._projecting: list[tuple[GuardState, Any, int]] = []  # rows joining the output embeddings' product
        self.widening = 0  # padding columns before the main prompt (a branch prompt longer than it rides along)
        self._widened_width = 0  # the padded prompt's width, while its forward runs

    # ---- the routing the attention hook reads (``halluguard.attention.routing``) ------------------
    @property
    def routes(self) -> list[Route]:
        """Which rows of the forward in progress belong to which stream's state."""
        return self.runner.apart if self.runner.apart is not None else self._routes

    def covers(self, module: Any) -> bool:
        """Whether ``module`` is one of the guarded model's text attention modules."""
        return id(module) in self._attention_modules

    # ---- the model's forward pre-hook ------------------------------------------------------------
    def before_forward(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Record a forward; returns its inputs with stream rows added, or None to leave them."""
        if self.runner.apart is not None:
            self.runner.feed(kwargs)
            return None
        cache = cache_in(kwargs)
        cache_len = cache_length(cache)
        given = kwargs
        kwargs = self._widened(kwargs, cache, cache_len)
        ids = kwargs.get("input_ids")
        tokens = ids if ids is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("a guarded forward needs input_ids or inputs_embeds")
        rows, new = tokens.shape[:2]
        self._main_rows = self._forward_rows = rows
        self._wants_tuple = kwargs.get("return_dict") is False
        self.main.on_forward(ids, kwargs.get("attention_mask"), cache_len, new, rows)
        if self.main.forwards == 1 or any(run.side is not None for run in self.branches.values()):
            self.history.record(ids, first=self.main.forwards == 1)
        self._routes = [Route(self.main, slice(0, rows))]
        self._extra = []
        if self.main.forwards == 1:
            extra = [row for spec in self.main.requested_streams(kwargs) for row in self._open(spec, kwargs, cache)]
        else:
            extra = [(run.state, run.step_rows(kwargs), run) for run in self.branches.values() if run.side is None]
        if extra:
            return self._with_extra_rows(kwargs, extra, cache_len, new)
        return dict(kwargs, return_dict=True) if kwargs is not given else None

    def _widened(self, kwargs: dict, cache: Any, cache_len: int) -> dict:
        """``kwargs`` with the main rows left-padded by ``widening`` columns. At the prompt's forward the
        widening is chosen: the most columns a method's branch prompt adds to the main prompt (ICD's
        prefix), when the branch rides along as rows (a cache that carries them, a 2-D mask); its
        prompt then fits the main rows' key layout. ``generate`` keeps its own unpadded ids, mask and
        positions; every later forward's mask gets the padding columns here."""
        mask = kwargs.get("attention_mask")
        if self.main.forwards == 0:
            fits = isinstance(cache, RowGroupsCache) and kwargs.get("input_ids") is not None
            fits = fits and self.main.for_generation and (mask is None or (torch.is_tensor(mask) and mask.dim() == 2))
            self.widening = max((m.widens_main_prompt_by() for m in self.methods), default=0) if fits else 0
            if not self.widening:
                return kwargs
            padded = left_padded(kwargs, self.widening)
            self.main.set_prompt(padded["input_ids"], padded["attention_mask"])
            self.main.guard_padding = self.widening
            self._widened_width = padded["input_ids"].shape[1]
            return padded
        if not self.widening:
            return kwargs
        if mask is None:
            tokens = kwargs.get("input_ids")
            tokens = tokens if tokens is not None else kwargs["inputs_embeds"]
            rows, new = tokens.shape[:2]
            mask = torch.ones(rows, cache_len - self.widening + new, dtype=torch.long, device=tokens.device)
        return dict(kwargs, attention_mask=torch.nn.functional.pad(mask, (self.widening, 0)))

    def _with_extra_rows(self, kwargs: dict, extra: list, cache_len: int, new: int) -> dict:
        """``kwargs`` with the rows of every extra stream appended, each stream told its rows. The
        extra rows are taken out of a ``ModelOutput``; a caller who asked for a tuple gets one back."""
        merged, start = dict(kwargs, return_dict=True), self._main_rows
        for state, inputs, stream in extra:
            count = inputs["input_ids"].shape[0]
            route = Route(state, slice(start, start + count))
            state.on_forward(inputs["input_ids"], inputs.get("attention_mask"), cache_len, new, count)
            self._routes.append(route)
            self._extra.append((route, stream))
            merged = merge_rows(
                merged,
                inputs,
                cache_len,
                positions_from_ids=self.adapter.positions_from_ids,
                row_image_inputs=self.adapter.row_image_inputs,
            )
            start += count
        self._forward_rows = start
        return merged

    def _open(self, spec: Any, kwargs: dict, cache: Any) -> list[tuple[GuardState, dict, Any]]:
        """Start a stream a method asked for; returns the rows it adds to this forward."""
        if isinstance(spec, Probe):
            return self._open_probe(spec, kwargs, cache)
        if isinstance(spec, Branch):
            self._open_branch(spec, kwargs, cache)
            return []
        raise TypeError(f"a method's streams() must return Probe or Branch objects, got {spec!r}")

    def _open_probe(self, spec: Probe, kwargs: dict, cache: Any) -> list[tuple[GuardState, dict, Any]]:
        """A probe rides along the prompt's forward when its rows can be dropped from the cache after,
        else it runs as its own forward first."""
        role = StreamRole("probe", spec.owner)
        shared = {spec.owner: self.main.data_of(spec.owner)}
        methods = [spec.owner] if spec.apart else self.methods  # a probe apart reads the model as it is
        state = GuardState(self.adapter, methods, for_generation=False, role=role, shared_data=shared)
        if not spec.apart and (cache is None or isinstance(cache, DynamicCache)):  # rows added, then dropped
            return [(state, spec.rows, spec)]
        self.runner.probe(spec, state, self.main, kwargs, shared, methods)
        return []

    def _open_branch(self, spec: Branch, kwargs: dict, cache: Any) -> None:
        """A branch rides along as extra rows of the main forwards (prefilled after the prompt's
        forward) when the cache can carry them, else it runs as its own forwards (a ``SideStream``)."""
        if spec.owner in self.branches:
            raise ValueError(f"{spec.owner.name} asked for two branches")
        role = StreamRole("branch", spec.owner)
        shared = {m: self.main.data_of(m) for m in spec.methods if m.shares_data_with_branches and m in self.methods}
        state = GuardState(self.adapter, list(spec.methods), for_generation=False, role=role, shared_data=shared)
        run = BranchRun(spec, state, kwargs)
        self.branches[spec.owner] = run
        if isinstance(cache, RowGroupsCache) and not spec.separate and run.fits_main_rows:
            run.pending = True  # prefilled after the prompt's forward, then its cache joins the main one
            return
        run.side = SideStream(
            lambda inputs: self.runner.side_forward(run, inputs),
            dict(run.prompt),
            self.main.prompt_len,
            rows_per_prompt=self._main_rows // (self._call_rows or self._main_rows),
        )
        if isinstance(cache, RowGroupsCache) and self.history.follow not in cache.followers:
            cache.followers.append(self.history.follow)  # beam search's reordering, told by the cache

    # ---- the model's forward post-hook -----------------------------------------------------------
    def after_forward(self, output: Any) -> Any:
        """Take the stream rows out of ``output``; returns the output the caller sees, or None."""
        if self.runner.apart is not None:
            return None
        changed = bool(self._extra) or bool(self.widening)
        if self._extra:
            self._take_extra_rows(output)
        if self.widening:
            output = without_leading_columns(output, self.widening, self._widened_width)
            self._widened_width = 0  # the prompt's forward is over: later forwards add tokens, not columns
        self._extra = []
        self._routes = [Route(self.main, slice(None))]
        for run in self.branches.values():
            if run.pending:  # after the prompt's forward: prefill apart, then ride along as rows
                cache_of(output).add_block(self.runner.prefill(run))
                run.pending = False
                run.state.position_offset = 0  # its keys now sit at the main cache's positions
            elif run.side is not None and run.spec.owner.edits_next_logits:
                run.logits = run.side.next_logits(self.history.tokens)
        if self.main.for_generation and self.main.changes_next_logits:
            output = self._adjust_next_logits(output)
            changed = True
        if self._wants_tuple and changed and not isinstance(output, tuple):
            output = output.to_tuple()
        return output if changed else None

    def _take_extra_rows(self, output: Any) -> None:
        """Each branch's next-token logits from its rows; the probes' rows dropped from the cache (they
        ride the prompt's forward only); the output left with the main rows."""
        rows, cache = self._main_rows, cache_of(output)
        for route, stream in self._extra:
            if isinstance(stream, BranchRun):
                stream.logits = output.logits[route.rows, -1].float()
        if any(isinstance(stream, Probe) for _, stream in self._extra) and isinstance(cache, DynamicCache):
            compat.select_cache_rows(cache, torch.arange(rows))
        take_rows(output, rows)

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
        for route in self.routes:
            route.stream.layer_input(layer_idx, rows_of(hidden, route))

    def on_layer_output(self, layer_idx: int, hidden: torch.Tensor) -> None:
        for route in self.routes:
            route.stream.layer_output(layer_idx, rows_of(hidden, route))

    def on_mlp_output(self, layer_idx: int, mlp_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A decoder layer's feed-forward output, after each stream's methods edited their rows."""
        parts, changed = [], False
        for route in self.routes:
            rows = rows_of(output, route)
            edited = route.stream.edit_mlp_output(layer_idx, rows_of(mlp_input, route), rows)
            changed = changed or edited is not rows
            parts.append(edited)
        return joined(parts) if changed else output

    def on_vision_mlp_output(self, layer_idx: int, output: torch.Tensor) -> torch.Tensor:
        """A vision encoder layer's feed-forward output (every image the call encodes, whichever stream it
        is for: the encoder's rows are images, not stream rows), after the methods' edits."""
        return self.main.edit_vision_mlp_output(layer_idx, output)

    def on_input_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """The text backbone's input embeddings, after each stream's methods edited their rows."""
        parts, changed = [], False
        for route in self.routes:
            rows = rows_of(embeds, route)
            edited = route.stream.edit_input_embeds(rows)
            changed = changed or edited is not rows
            parts.append(edited)
        return joined(parts) if changed else embeds

    # ---- the output embeddings' product (hooks on the output embeddings) -------------------------
    def before_output_embeddings(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The model's last hidden states ``(rows, 1, d)`` with the rows methods project in the same
        product appended (``Method.rows_to_project``), or None to leave them: only the forward's own
        product at its last position, not another call of the module (a method's logit lens)."""
        if self.runner.apart is not None or hidden.dim() != 3 or hidden.shape[:2] != (self._forward_rows, 1):
            return None
        pending = [(route.stream, m, rows) for route in self.routes for m, rows in route.stream.rows_to_project()]
        if not pending:
            return None
        self._projecting = [(state, method, rows.shape[0]) for state, method, rows in pending]
        return torch.cat([hidden, *(rows.to(hidden)[:, None] for _, _, rows in pending)])

    def after_output_embeddings(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The product's rows of the forward (returned), the appended rows' logits handed to their methods."""
        if not self._projecting:
            return None
        start = self._forward_rows
        for state, method, count in self._projecting:
            method.on_projected_rows(state, logits[start : start + count, 0])
            start += count
        self._projecting = []
        return logits[: self._forward_rows]

    # ---- after the call --------------------------------------------------------------------------
    def finish(self, cache: Any) -> None:
        """After the call: the caller's cache holds the main rows only."""
        if isinstance(cache, RowGroupsCache):
            cache.drop_extra_blocks()
            cache.followers.clear()
            if self.widening:  # and the main prompt's padding columns, as an unguarded call's cache
                compat.drop_leading_tokens(cache, self.widening)
