"""How the attention hook learns which rows of a call belong to which stream: the call's routing.

A guarded call makes the routing current for its duration (``routed``); the hook reads it with
``routing_for(module)`` at every attention call. The routing is a context variable, not an
argument: transformers hands the attention function the keyword arguments of the model's forward
only where a family's code passes them on, and not every family does so down to its text backbone's
attention, while a context variable reaches every family's attention call unchanged (the call runs
in the thread, and the context, of the guarded ``generate``). Each routing names the attention
modules it covers, so another model's forward inside a guarded call (or a thread of its own) is
never routed by it.

Notation: a forward has ``rows`` batch rows; a ``Route`` gives a contiguous range of them to one
stream, whose ``StreamHandle`` is what the hook talks to (a ``halluguard.state.GuardState``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .derived import Derived
from .edits import AttentionCall, AttentionEdit


class StreamHandle(Protocol):
    """What the hook asks of one stream's state, in the order of a call."""

    derived: Derived  # tensors the stream's calls share, made once (its forward's mask, per-forward edits)

    def describe_call(self, layer_idx: int, rows: int, query: torch.Tensor, key: torch.Tensor) -> AttentionCall:
        """The call as the stream sees it: its ``rows`` of the call's ``query`` and ``key`` (positions of
        its keys and queries)."""

    def edits_for(self, call: AttentionCall) -> list[tuple[Any, AttentionEdit]]:
        """Phase one: each acting method and the edit (and reductions) it asks of ``call``."""

    def deliver(self, call: AttentionCall, method: Any, stats: dict[str, torch.Tensor]) -> None:
        """The reductions ``method`` asked for."""

    def late_head_scale(self, call: AttentionCall, method: Any) -> torch.Tensor | None:
        """Phase two: the ``(B, H)`` head scale ``method`` chose from its statistics."""


@dataclasses.dataclass(frozen=True)
class Route:
    """Rows ``rows`` of the current forward belong to the stream ``stream``."""

    stream: StreamHandle
    rows: slice


def rows_of(tensor: torch.Tensor, route: Route) -> torch.Tensor:
    """The rows of ``tensor`` (batch first) that ``route`` covers (all of them: the tensor itself, no slice)."""
    start, stop, step = route.rows.indices(tensor.shape[0])
    return tensor if (start, stop, step) == (0, tensor.shape[0], 1) else tensor[route.rows]


class Routing(Protocol):
    """The routing of one guarded call: the routes of the forward in progress (they change from forward
    to forward as streams join and leave), and the attention modules it covers."""

    @property
    def routes(self) -> Sequence[Route]: ...

    def covers(self, module: nn.Module) -> bool: ...


_CURRENT: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("halluguard_routing", default=None)


@contextlib.contextmanager
def routed(routing: Routing) -> Iterator[Routing]:
    """Make ``routing`` current for the attention calls made inside the ``with`` block."""
    token = _CURRENT.set(routing)
    try:
        yield routing
    finally:
        _CURRENT.reset(token)


def routing_for(module: nn.Module) -> Routing | None:
    """The current routing if it covers ``module`` (None outside a guarded call of its model)."""
    routing = _CURRENT.get()
    return routing if routing is not None and routing.covers(module) else None
