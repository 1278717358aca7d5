"""The interface every method implements.

A method sees each guarded ``generate`` through the ``GuardState`` of every stream it acts in.
The flow is one-way: the guard's session and the attention hook report to the state, and only
the state calls the method:

* ``new_call_state()`` once per stream and call: the method's typed per-call data (a dataclass;
  ``state.data_of(self)`` returns it), never kept on the model or on the method;
* ``on_prompt(state)`` at the stream's first forward, when its key groups are known;
* ``streams(state, inputs)`` at the main stream's first forward: extra streams the method needs
  (a ``Probe``: rows riding along the prompt's forward; a ``Branch``: a contrast stream that
  follows the generation; see ``halluguard.decoding``);
* ``attention_edit(state, call)`` for every attention call of the text backbone: an
  ``AttentionEdit`` (edits and reductions) or ``None``;
* ``on_stats(state, call, stats)`` with the reductions it asked for; then, if its edit set
  ``head_scale_from_stats``, ``head_scale_from_stats(state, call)`` for the call's head scale;
* ``on_layer_input(state, layer_idx, hidden)`` before every decoder layer, for methods that set
  ``reads_layer_inputs`` (residual-stream reads such as VAR's sink detection);
* ``on_layer_output(state, layer_idx, hidden)`` after every decoder layer, for methods that set
  ``reads_layer_outputs`` (the residual stream a layer hands on: VISTA's steering vector, a logit
  lens such as MemVR's);
* ``edit_mlp_output(state, layer_idx, mlp_input, output)`` on every decoder layer's feed-forward
  output, for methods that set ``edits_mlp_outputs`` (VISTA's steering, MemVR's visual memory);
* ``edit_vision_mlp_output(state, layer_idx, output)`` on every vision encoder layer's feed-forward
  output, for every image a guarded call encodes (the main state given), for methods that set
  ``edits_vision_mlp_outputs`` (VTI's visual steering);
* ``edit_input_embeds(state, embeds)`` on the text backbone's input embeddings of the streams the
  method acts in, for methods that set ``edits_input_embeds`` (AvisC's blind-token view);
* ``rows_to_project(state)`` at the model's own product of its last hidden states with the output
  embeddings, for methods that set ``projects_rows``: rows ``(n, d)`` that join that product (one
  read of the embeddings for both), their logits handed back by ``on_projected_rows(state, logits)``
  (VISTA's late-layer mix, ONLY's read-out);
* ``augment_next_logits(state, logits)``: the main rows' next-token logits, mixed with logits the
  method reads inside the same forward (no branch: VISTA's self-logits augmentation), for methods
  that set ``augments_next_logits``; it runs before any contrast;
* ``next_token_logits(state, logits)``: the main rows' next-token logits as the model returns
  them, before ``generate``'s processors and warpers (contrastive decoding: VCD, AvisC, DeCoRe; a
  method that implements it declares ``Capabilities(contrasts=True)``);
* ``logits_processors(state)`` once per ``generate``, to act on the next-token scores after
  ``generate``'s own processors (PAI's guidance);
* ``generate_loop(state)``: a method that owns the decoding loop returns it (a ``custom_generate``
  callable, see ``halluguard.decoding.loops``) and declares ``Capabilities(owns_loop=True)``; at most
  one method of a guard may;
* ``call_result(state, sequences)`` after the call: what the method read (Lookback Lens' detections),
  kept as ``guard.results[name]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import MethodConfig
from .capabilities import Capabilities, Declared, resolve

if TYPE_CHECKING:
    import torch

    from ..adapters import Adapter
    from ..attention.edits import AttentionCall, AttentionEdit
    from ..state import GuardState


class Method:
    """A method's implementation. What it can do is its ``capabilities`` (``halluguard.methods.capabilities``),
    declared once with its registration: on the class, the declaration (a ``Capabilities`` or a function
    of the config); on an instance, the capabilities for its config."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    capabilities: ClassVar[Declared] = Capabilities()
    # which of the guard's hooks the method needs (wiring, not capabilities)
    reads_layer_inputs: ClassVar[bool] = False
    reads_layer_outputs: ClassVar[bool] = False
    edits_mlp_outputs: ClassVar[bool] = False
    edits_vision_mlp_outputs: ClassVar[bool] = False
    edits_input_embeds: ClassVar[bool] = False
    augments_next_logits: ClassVar[bool] = False
    projects_rows: ClassVar[bool] = False
    # a branch stream shares this method's per-call data with the main stream (VHR's heads, chosen
    # in the main stream, are reinforced in the branch too) instead of starting its own
    shares_data_with_branches: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(self.config).__name__}"
            )
        self.capabilities = resolve(type(self).capabilities, self.config)
        self._check_declared()

    def _check_declared(self) -> None:
        """A hook the capabilities name is implemented, and an implemented hook is declared (else it
        would silently never run)."""
        cls, declared = type(self), type(self).capabilities
        for hook, flag in (("generate_loop", "owns_loop"), ("next_token_logits", "contrasts")):
            overridden = getattr(cls, hook) is not getattr(Method, hook)
            says = getattr(self.capabilities, flag)
            if says and not overridden:
                raise TypeError(f"{cls.__name__} declares {flag} but does not implement {hook}")
            if overridden and not says and isinstance(declared, Capabilities):
                raise TypeError(f"{cls.__name__} implements {hook}: declare Capabilities({flag}=True)")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def edits_next_logits(self) -> bool:
        """True when the method changes the next-token logits (a contrast of its own)."""
        return self.capabilities.contrasts

    @property
    def owns_loop(self) -> bool:
        """True when the method provides its own decoding loop (``generate_loop``)."""
        return self.capabilities.owns_loop

    def decoding_refusal(self, num_beams: int, do_sample: bool) -> str | None:
        """Why the method cannot decode with ``num_beams`` beams and ``do_sample`` (None: it can),
        from its capabilities. A guarded ``generate`` asks before it starts; so may anyone who sets
        decoding earlier (the demo's ``:set``)."""
        return self.capabilities.decoding_refusal(self.config, num_beams, do_sample)

    def setup(self, adapter: Adapter) -> None:
        """Called by ``wrap``: check that the model suits the method (raise ``ValueError`` if not)."""

    def new_call_state(self) -> Any:
        """The method's per-call data for one stream (a dataclass), or None if it keeps none."""
        return None

    def on_prompt(self, state: GuardState) -> None:
        """Called once per stream and call, at its first forward (``state.groups`` is set)."""

    def streams(self, state: GuardState, inputs: dict[str, Any]) -> list[Any]:
        """Extra streams (``Probe``/``Branch``) to run beside the main stream, given the inputs of the
        main stream's first forward; called once per call."""
        return []

    def rows_to_project(self, state: GuardState) -> torch.Tensor | None:
        """Rows ``(n, d)`` (the output embeddings' input space) to project in the current forward's own
        product with the output embeddings (only if ``projects_rows``); None: none this forward. The
        product runs only where the model asks for its last position's logits alone; else the method's
        rows are not taken, and it projects them itself."""
        return None

    def on_projected_rows(self, state: GuardState, logits: torch.Tensor) -> None:
        """The logits ``(n, vocab)`` of the rows ``rows_to_project`` gave, out of the model's own product."""

    def widens_main_prompt_by(self) -> int:
        """How many tokens this method's branch prompt adds to the main prompt (ICD's instruction
        prefix; 0: none). The guard pads the main prompt on the left by as many masked columns, so
        the branch rides along as rows of the main forwards; the caller sees no padding."""
        return 0

    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None:
        return None

    def on_stats(self, state: GuardState, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None:
        """Reductions reported by an attention call (phase one)."""

    def head_scale_from_stats(self, state: GuardState, call: AttentionCall) -> torch.Tensor | None:
        """Phase two, for an edit that set ``head_scale_from_stats``: the call's ``(B, H)`` head scale."""
        return None

    def edit_input_embeds(self, state: GuardState, embeds: torch.Tensor) -> torch.Tensor | None:
        """The text backbone's input embeddings ``(rows, T, d)`` of a forward of ``state``'s stream,
        edited, or None to leave them (only if ``edits_input_embeds``)."""
        return None

    def next_token_logits(self, state: GuardState, logits: torch.Tensor) -> torch.Tensor:
        """The main rows' next-token logits ``(rows, vocab)``, changed (float32); called after every
        forward of a guarded ``generate``, before its processors."""
        return logits

    def logits_processors(self, state: GuardState) -> list[Any]:
        return []

    def on_layer_input(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None:
        """The residual stream entering decoder layer ``layer_idx`` (only if ``reads_layer_inputs``)."""

    def on_layer_output(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None:
        """The residual stream leaving decoder layer ``layer_idx`` (only if ``reads_layer_outputs``)."""

    def edit_mlp_output(
        self, state: GuardState, layer_idx: int, mlp_input: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None:
        """Decoder layer ``layer_idx``'s feed-forward ``output`` ``(rows, T, d)`` for its input
        ``mlp_input``, edited, or None to leave it (only if ``edits_mlp_outputs``)."""
        return None

    def edit_vision_mlp_output(self, state: GuardState, layer_idx: int, output: torch.Tensor) -> torch.Tensor | None:
        """Vision encoder layer ``layer_idx``'s feed-forward ``output`` ``(images, tokens, d)``, edited, or
        None to leave it (only if ``edits_vision_mlp_outputs``)."""
        return None

    def augment_next_logits(self, state: GuardState, logits: torch.Tensor) -> torch.Tensor:
        """The main rows' next-token logits ``(rows, vocab)`` (float32) mixed with what the method
        read in the same forward (only if ``augments_next_logits``)."""
        return logits

    def call_result(self, state: GuardState, sequences: torch.Tensor) -> Any:
        """What the method read during a guarded ``generate`` (given its output ``sequences``), kept by
        the guard as ``guard.results[name]`` until the next call; None for nothing."""
        return None

    def generate_loop(self, state: GuardState) -> Callable[..., Any] | None:
        """The decoding loop this method owns, as a ``generate(custom_generate=...)`` callable."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
