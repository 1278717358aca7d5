"""``wrap`` and ``Guard``: guard a model's ``generate`` in place, and restore it exactly.

``wrap(model, processor, methods)`` changes only this model instance:

1. the text backbone's attention implementation becomes ``"halluguard"`` (the previous one is
   kept and restored; the vision tower is untouched);
2. each text attention module gets a reference to the guard, which the hook reads;
3. a forward pre-hook on the model reports the ids of each forward to the current state (and,
   for methods that read the residual stream, pre-hooks on the decoder layers hand it to them);
   at a call's first forward it also runs the extra forward a method may ask for (a probe, such
   as VHR's text-only stream), under a separate state, before the prompt's own forward;
4. ``model.generate`` (an instance attribute) routes through ``Guard.generate``, which makes a
   fresh ``GuardState`` per call, adds the methods' logits processors, and drops the state after.

``Guard.unwrap()`` undoes all four; logits are then bit-identical to the unwrapped model's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from . import registry
from .adapters import Adapter, adapter_for
from .attention import GUARD_ATTRIBUTE, HOOK_NAME
from .methods.base import Method
from .state import GuardState

# Pairs of decoding-loop owners whose combination is defined and tested (none yet).
COMPOSABLE_DECODING_PAIRS: frozenset[frozenset[str]] = frozenset()


class Guard:
    """Handle of a wrapped model: ``generate``, ``unwrap``, and a context manager."""

    def __init__(self, model: nn.Module, processor: Any, methods: list[Method], adapter: Adapter):
        self.model = model
        self.processor = processor
        self.methods = methods
        self.adapter = adapter
        self.state: GuardState | None = None  # the state of the guarded call in progress, if any
        self.wrapped = False
        previous = adapter.text_attn_implementation()
        self._previous_attn = previous
        # Unedited calls run the model's own attention: eager if it was eager, SDPA otherwise
        # (flash/flex kernels take masks in another layout; SDPA is their exact-math equivalent).
        self.base_attention = "eager" if previous == "eager" else "sdpa"
        self._original_generate = model.generate
        self._own_generate = model.__dict__.get("generate")
        self._hook_handle = None
        self._layer_handles: list = []

    # ---- install / restore ------------------------------------------------------------------------
    def _install(self) -> None:
        self.adapter.set_text_attn_implementation(HOOK_NAME)
        for module in self.adapter.attention_modules():
            setattr(module, GUARD_ATTRIBUTE, self)
        setattr(self.model, GUARD_ATTRIBUTE, self)
        self._hook_handle = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        readers = [m for m in self.methods if m.reads_layer_inputs]
        if readers:
            self._layer_handles = [
                layer.register_forward_pre_hook(functools.partial(self._before_layer, i, readers), with_kwargs=True)
                for i, layer in enumerate(self.adapter.decoder_layers())
            ]
        self.model.generate = self.generate
        self.wrapped = True

    def unwrap(self) -> nn.Module:
        """Restore the model exactly as it was before ``wrap``; returns it. Idempotent."""
        if not self.wrapped:
            return self.model
        self.wrapped = False
        for handle in [self._hook_handle, *self._layer_handles]:
            if handle is not None:
                handle.remove()
        self._hook_handle, self._layer_handles = None, []
        if self._own_generate is not None:
            self.model.generate = self._own_generate
        else:
            del self.model.generate
        for module in self.adapter.attention_modules():
            if getattr(module, GUARD_ATTRIBUTE, None) is self:
                delattr(module, GUARD_ATTRIBUTE)
        delattr(self.model, GUARD_ATTRIBUTE)
        self.adapter.set_text_attn_implementation(self._previous_attn)
        return self.model

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.unwrap()
        return False

    # ---- generation --------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.state is None:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else embeds
        if tokens is None:
            raise ValueError("a guarded forward needs input_ids or inputs_embeds")
        cache = kwargs.get("past_key_values")
        past_len = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        first = self.state.forwards == 0
        self.state.on_forward(input_ids, kwargs.get("attention_mask"), past_len, tokens.shape[1], tokens.shape[0])
        if first and self.state.probe_of is None:
            inputs = dict(kwargs, input_ids=input_ids) if input_ids is not None else dict(kwargs)
            for method in self.methods:
                self._run_probe(method, inputs)

    def _run_probe(self, method: Method, inputs: dict) -> None:
        """Run ``method``'s extra forward (if it asks for one) under its own state; see ``Method``."""
        state = self.state
        probe_inputs = method.probe_inputs(state, inputs)
        if probe_inputs is None:
            return
        probe_inputs = dict(probe_inputs, past_key_values=None, use_cache=False)
        probe = GuardState(
            self.adapter,
            self.methods,
            probe_inputs["input_ids"],
            probe_inputs.get("attention_mask"),
            for_generation=False,
            probe_of=method.name,
        )
        self._side_forward(probe, probe_inputs)
        method.after_probe(state, probe)

    def _side_forward(self, side: GuardState, inputs: dict) -> Any:
        """One forward of the model under ``side`` instead of the call's state (probes, side streams)."""
        previous = self.state
        self.state = side
        try:
            with torch.no_grad():
                return self.model(**inputs)
        finally:
            self.state = previous

    def _before_layer(
        self, layer_idx: int, readers: list[Method], module: nn.Module, args: tuple, kwargs: dict
    ) -> None:
        if self.state is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        for method in readers:
            if method in self.state.methods:  # side streams run without (some) methods
                method.on_layer_input(self.state, layer_idx, hidden)

    @contextlib.contextmanager
    def _session(self, args: tuple, kwargs: dict, for_generation: bool) -> Iterator[GuardState]:
        """A fresh ``GuardState`` for one guarded call, dropped after it."""
        if self.state is not None:
            raise RuntimeError("a guarded call is already running on this model")
        input_ids = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs"), *args[:1]) if v is not None), None)
        state = GuardState(
            self.adapter,
            self.methods,
            input_ids if isinstance(input_ids, torch.Tensor) else None,
            kwargs.get("attention_mask"),
            for_generation=for_generation,
        )
        state.call_inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        if isinstance(input_ids, torch.Tensor):
            state.call_inputs["input_ids"] = input_ids
        state.side_runner = self._side_forward
        self.state = state
        try:
            yield state
        finally:
            self.state = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with the methods applied; same arguments and outputs."""
        if not self.wrapped:
            raise RuntimeError("this guard was unwrapped; wrap the model again to guard it")
        if not self.methods:
            return self._original_generate(*args, **kwargs)
        with self._session(args, kwargs, for_generation=True) as state:
            processors = [p for m in self.methods for p in m.logits_processors(state)]
            if processors:
                kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), *processors])
            return self._original_generate(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """One guarded forward pass over a prompt (a prefill), e.g. to score answers directly."""
        if not self.wrapped:
            raise RuntimeError("this guard was unwrapped; wrap the model again to guard it")
        if not self.methods:
            return self.model(*args, **kwargs)
        with self._session(args, kwargs, for_generation=False) as state:
            acting = [m.name for m in self.methods if m.logits_processors(state)]
            if acting:
                raise ValueError(
                    f"{', '.join(acting)} act(s) on next-token scores during generate (e.g. PAI's "
                    "guidance branch); Guard.forward returns one forward's raw logits, so use generate "
                    "(e.g. with max_new_tokens=1, output_scores=True) to score with them"
                )
            return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        names = "+".join(m.name for m in self.methods) or "none"
        status = "wrapped" if self.wrapped else "unwrapped"
        return f"Guard({type(self.model).__name__}, methods={names}, {status})"


def _build_methods(spec: Any) -> list[Method]:
    items = registry.parse_methods(spec)
    configs = [i.config if isinstance(i, Method) else i for i in items]
    names = [c.name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"method(s) {repeated} given more than once; compose distinct methods")
    owners = [(c.name, loop) for c in configs if (loop := c.decoding_loop()) is not None]
    for i, (a, loop_a) in enumerate(owners):
        for b, loop_b in owners[i + 1 :]:
            if frozenset((a, b)) not in COMPOSABLE_DECODING_PAIRS:
                raise ValueError(
                    f"cannot compose {a!r} with {b!r}: both take over the decoding loop "
                    f"({a}: {loop_a}; {b}: {loop_b}) and no combination of the two is defined"
                )
    methods = []
    for item in items:
        if isinstance(item, Method):
            methods.append(item)
            continue
        entry = registry.entry(item.name)
        if entry.method_cls is None:
            ready = ", ".join(registry.list_methods(available_only=True)) or "none yet"
            raise ValueError(
                f"method {item.name!r} has a config ({type(item).__name__}) but no implementation "
                f"in this release; methods that run: {ready}"
            )
        methods.append(entry.method_cls(item))
    return methods


def wrap(model: nn.Module, processor: Any = None, methods: Any = ()) -> Guard:
    """Guard ``model.generate`` with ``methods``; returns the ``Guard`` handle.

    ``methods``: a name (``"vhr"``), a ``+``-joined composition (``"vhr+var"``), a config object
    (``VHRConfig(alpha=2)``), a ``Method`` instance, or a list of these; ``[]`` changes nothing.
    ``processor`` is optional (image positions come from ``input_ids`` and the model config).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap needs a transformers model, got {type(model).__name__}")
    existing = getattr(model, GUARD_ATTRIBUTE, None)
    if existing is not None:
        raise ValueError(f"this model is already wrapped ({existing!r}); call unwrap() on that guard first")
    adapter = adapter_for(model, processor)
    built = _build_methods(methods)
    for method in built:
        method.setup(adapter)
    guard = Guard(model, processor, built, adapter)
    guard._install()
    return guard


__all__ = ["Guard", "wrap"]
