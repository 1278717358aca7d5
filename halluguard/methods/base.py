"""The interface every method implements.

A method sees each guarded ``generate`` through a fresh ``GuardState``:

* ``on_prompt(state)`` once, at the first forward, when the key groups are known;
* ``attention_edit(state, call)`` for every attention call of the text backbone, returning an
  ``AttentionEdit`` (edits and reductions) or ``None``;
* ``on_stats(state, call, stats)`` with the reductions it (or another method) asked for;
* ``logits_processors(state)`` once per ``generate``, to act on the next-token scores;
* ``on_layer_input(state, layer_idx, hidden_states)`` before every decoder layer, for methods
  that set ``reads_layer_inputs`` (residual-stream reads such as VAR's sink detection);
* ``probe_inputs(state, inputs)`` at the first forward: a method may return the inputs of one
  extra forward (a *probe*, e.g. VHR's prompt paired with a text-only copy) that the guard runs
  before the prompt's own forward, under a separate ``GuardState`` whose ``probe_of`` is the
  method's name and with every method's edits active; ``after_probe(state, probe)`` then hands
  what the probe collected to the call's state.

Methods keep per-call data in ``state.scratch[self.name]`` (a dict), never on the model or on
themselves, so concurrent models and successive calls never share it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..config import MethodConfig

if TYPE_CHECKING:
    import torch

    from ..adapters import Adapter
    from ..attention.edits import AttentionCall, AttentionEdit
    from ..state import GuardState


class Method:
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    reads_layer_inputs: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(self.config).__name__}"
            )

    @property
    def name(self) -> str:
        return self.config.name

    def setup(self, adapter: "Adapter") -> None:
        """Called by ``wrap``: check that the model suits the method (raise ``ValueError`` if not)."""

    def on_prompt(self, state: "GuardState") -> None:
        """Called once per guarded call, at its first forward (``state.groups`` is set)."""

    def attention_edit(self, state: "GuardState", call: "AttentionCall") -> "AttentionEdit | None":
        return None

    def on_stats(self, state: "GuardState", call: "AttentionCall", stats: "dict[str, torch.Tensor]") -> None:
        """Reductions reported by an attention call."""

    def logits_processors(self, state: "GuardState") -> list[Any]:
        return []

    def on_layer_input(self, state: "GuardState", layer_idx: int, hidden_states: "torch.Tensor") -> None:
        """The residual stream entering decoder layer ``layer_idx`` (only if ``reads_layer_inputs``)."""

    def probe_inputs(self, state: "GuardState", inputs: dict[str, Any]) -> dict[str, Any] | None:
        """Inputs of an extra forward to run before the prompt's forward ``inputs``, or None."""
        return None

    def after_probe(self, state: "GuardState", probe: "GuardState") -> None:
        """Called after the probe forward, with its state."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
