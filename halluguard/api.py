"""``wrap`` and ``Guard``: guard a model's ``generate`` in place, and restore it exactly.

``wrap(model, processor, methods)`` changes only this model instance:

1. the text backbone's attention implementation becomes ``"halluguard"`` (the previous one is
   kept and restored; the vision tower is untouched);
2. every guarded call makes its routing current for the hook (``halluguard.attention.routing``):
   which rows of each forward belong to which stream, for this model's text attention modules;
3. a forward pre-hook and a forward hook on the model report every forward to the call's
   ``Session`` (``halluguard.decoding``), which adds and removes the rows of the streams methods
   ask for (and, for methods that read or steer the residual stream, hooks on the decoder layers
   and their feed-forward blocks hand it to them);
4. ``model.generate`` (an instance attribute) routes through ``Guard.generate``, which makes a
   fresh ``Session`` per call, adds the methods' logits processors and decoding loop, gives
   ``generate`` a cache that extra stream rows can ride in, and drops the session after.

``Guard.unwrap()`` undoes all four; logits are then bit-identical to the unwrapped model's.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, LogitsProcessorList

from . import compat, registry
from .adapters import Adapter, adapter_for
from .attention import hook_name, routed
from .config import MethodConfig
from .decoding import RowGroupsCache, Session
from .methods.base import Method
from .state import GuardState

GUARD_ATTRIBUTE = "_halluguard_guard"  # the guard of a wrapped model, on the model itself
# generate arguments that limit an answer's length (a method's default limit applies when a call sets none)
LENGTH_ARGUMENTS = ("max_new_tokens", "max_length")


class Guard:
    """Handle of a wrapped model: ``generate``, ``forward``, ``unwrap``, and a context manager."""

    def __init__(self, model: nn.Module, processor: Any, methods: list[Method], adapter: Adapter):
        self.model = model
        self.processor = processor
        self.methods = methods
        self.adapter = adapter
        self.session: Session | None = None  # the guarded call in progress, if any
        self.results: dict[str, Any] = {}  # what methods read during the last guarded generate
        self.wrapped = False
        previous = adapter.text_attn_implementation()
        self._previous_attn = previous
        # Unedited calls run the model's own attention: eager if it was eager, SDPA otherwise
        # (flash/flex kernels take masks in another layout; SDPA is their exact-math equivalent).
        self.base_attention = "eager" if previous == "eager" else "sdpa"
        self._original_generate = model.generate
        self._own_generate = model.__dict__.get("generate")
        self._handles: list = []
        self._warned_positions = False
        self._attention_modules: frozenset[int] = frozenset()

    @property
    def state(self) -> GuardState | None:
        """The main stream's state of the guarded call in progress, if any."""
        return self.session.main if self.session is not None else None

    # ---- install / restore ------------------------------------------------------------------------
    def _install(self) -> None:
        self.adapter.set_text_attn_implementation(hook_name(self.base_attention))
        self._attention_modules = frozenset(id(m) for m in self.adapter.attention_modules())
        setattr(self.model, GUARD_ATTRIBUTE, self)
        self._handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward),
        ]
        if any(m.edits_input_embeds for m in self.methods):
            self._handles.append(
                self.adapter.decoder().register_forward_pre_hook(self._before_decoder, with_kwargs=True)
            )
        if any(m.reads_layer_inputs for m in self.methods):
            self._handles += [
                layer.register_forward_pre_hook(functools.partial(self._before_layer, i), with_kwargs=True)
                for i, layer in enumerate(self.adapter.decoder_layers())
            ]
        if any(m.reads_layer_outputs for m in self.methods):
            self._handles += [
                layer.register_forward_hook(functools.partial(self._after_layer, i))
                for i, layer in enumerate(self.adapter.decoder_layers())
            ]
        if any(m.edits_mlp_outputs for m in self.methods):
            self._handles += [
                mlp.register_forward_hook(functools.partial(self._after_mlp, i))
                for i, mlp in enumerate(self.adapter.mlp_modules())
            ]
        if any(m.projects_rows for m in self.methods):
            head = self.model.get_output_embeddings()
            self._handles += [
                head.register_forward_pre_hook(self._before_output_embeddings),
                head.register_forward_hook(self._after_output_embeddings),
            ]
        if any(m.edits_vision_mlp_outputs for m in self.methods):
            self._handles += [
                mlp.register_forward_hook(functools.partial(self._after_vision_mlp, i))
                for i, mlp in enumerate(self.adapter.vision_mlp_modules())
            ]
        self.model.generate = self.generate
        self.wrapped = True

    def unwrap(self) -> nn.Module:
        """Restore the model exactly as it was before ``wrap``; returns it. Idempotent."""
        if not self.wrapped:
            return self.model
        self.wrapped = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._own_generate is not None:
            self.model.generate = self._own_generate
        else:
            del self.model.generate
        delattr(self.model, GUARD_ATTRIBUTE)
        self.adapter.set_text_attn_implementation(self._previous_attn)
        return self.model

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwrap()

    # ---- hooks: every forward reports to the call's session ----------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.session is None:
            return None
        if args:  # the session reads inputs by name
            kwargs = dict(kwargs, input_ids=args[0])
            args = args[1:]
        changed = self.session.before_forward(kwargs)
        return (args, changed if changed is not None else kwargs)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.session is None:
            return None
        return self.session.after_forward(output)

    def _before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if self.session is None or embeds is None:
            return None
        edited = self.session.on_input_embeds(embeds)
        return None if edited is embeds else (args, dict(kwargs, inputs_embeds=edited))

    def _before_layer(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.session is not None:
            self.session.on_layer_input(layer_idx, args[0] if args else kwargs["hidden_states"])

    def _after_layer(self, layer_idx: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self.session is not None:
            self.session.on_layer_output(layer_idx, output[0] if isinstance(output, tuple) else output)

    def _after_mlp(self, layer_idx: int, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        if self.session is None:
            return None
        edited = self.session.on_mlp_output(layer_idx, args[0], output)
        return None if edited is output else edited

    def _after_vision_mlp(self, layer_idx: int, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        if self.session is None:
            return None
        edited = self.session.on_vision_mlp_output(layer_idx, output)
        return None if edited is output else edited

    def _before_output_embeddings(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.session is None or not args:
            return None
        joined = self.session.before_output_embeddings(args[0])
        return None if joined is None else (joined, *args[1:])

    def _after_output_embeddings(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        return None if self.session is None else self.session.after_output_embeddings(output)

    @contextlib.contextmanager
    def _call(self, args: tuple, kwargs: dict, for_generation: bool) -> Iterator[Session]:
        """A fresh ``Session`` for one guarded call, dropped after it."""
        if self.session is not None:
            raise RuntimeError("a guarded call is already running on this model")
        ids = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs"), *args[:1]) if v is not None), None)
        ids = ids if isinstance(ids, torch.Tensor) else None
        if ids is not None and 0 in ids.shape:
            raise ValueError(f"a guarded call needs a prompt: input_ids has shape {tuple(ids.shape)}")
        self.session = Session(
            self.model,
            self.adapter,
            self.methods,
            ids,
            kwargs.get("attention_mask"),
            for_generation=for_generation,
            attention_modules=self._attention_modules,
        )
        self.session.main.call_inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        try:
            with routed(self.session):
                yield self.session
        finally:
            self.session = None

    # ---- guarded calls -------------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with the methods applied; same arguments and outputs. A ``streamer`` is
        ended when the call fails, so a thread reading it never waits for tokens that will not come."""
        self._check_wrapped()
        streamer = kwargs.get("streamer")
        try:
            return self._generate(*args, **kwargs)
        except BaseException:
            if streamer is not None:
                with contextlib.suppress(Exception):  # the call's own error is the one to see
                    streamer.end()
            raise

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_positions(args, kwargs)
        if not self.methods:
            return self._original_generate(*args, **kwargs)
        kwargs = self._with_method_defaults(kwargs)
        self._check_decoding(kwargs)
        with self._call(args, kwargs, for_generation=True) as session:
            state = session.main
            processors = [p for m in self.methods for p in m.logits_processors(state)]
            if processors:
                kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), *processors])
            loops = [(m, loop) for m in self.methods if (loop := m.generate_loop(state)) is not None]
            late = [m for m, _ in loops if m.capabilities.late_tokens is not None]
            if late and kwargs.get("streamer") is not None:
                raise ValueError(f"{late[0].name} cannot stream: {late[0].capabilities.late_tokens}; drop the streamer")
            if loops and processors:
                raise ValueError(
                    "a method of this guard owns the decoding loop, and another acts through a logits processor "
                    "with its own stream (e.g. PAI's guidance), which that loop's rows cannot carry: turn it off "
                    "(e.g. PAIConfig(use_cfg=False))"
                )
            if loops:
                if kwargs.get("custom_generate") is not None:
                    raise ValueError("a method of this guard owns the decoding loop; custom_generate cannot be given")
                kwargs["custom_generate"] = loops[0][1]
            if self._default_cache(kwargs):  # (a cache argument given as None is dropped, under either name)
                cache = RowGroupsCache(config=self.model.config.get_text_config(decoder=True))
                kwargs = {**compat.without_cache(kwargs), compat.CACHE: cache}
            else:
                self._check_beams_apart(kwargs)
            cache = compat.cache_in(kwargs)
            self.results = {}
            try:
                out = self._original_generate(*args, **kwargs)
                sequences = out if isinstance(out, torch.Tensor) else out.sequences
                for method in self.methods:
                    result = method.call_result(state, sequences)
                    if result is not None:
                        self.results[method.name] = result
                return out
            finally:
                session.finish(cache)

    def _with_method_defaults(self, kwargs: dict) -> dict:
        """``kwargs`` with the methods' ``generation_defaults`` (the official runs' decoding, e.g. VCD's
        sampling) when the caller gave no generation config: the length (``max_new_tokens``) when the
        caller set none, the decoding settings when the caller chose none of them."""
        defaults = {k: v for m in self.methods for k, v in m.capabilities.generation_defaults.items()}
        if not defaults or "generation_config" in kwargs:
            return kwargs
        length = {k: v for k, v in defaults.items() if k in LENGTH_ARGUMENTS}
        decoding = {k: v for k, v in defaults.items() if k not in LENGTH_ARGUMENTS}
        chosen = dict(kwargs)
        if length and not any(k in kwargs for k in LENGTH_ARGUMENTS):
            chosen.update(length)
        if decoding and not any(k in kwargs for k in decoding):
            chosen.update(decoding)
        return chosen

    def _default_cache(self, kwargs: dict) -> bool:
        """Whether ``generate`` would make its default dynamic cache (then the guard makes one whose
        extra row blocks follow beam search, so branch streams can ride along as rows)."""
        if compat.cache_in(kwargs) is not None:
            return False
        config = kwargs.get("generation_config") or self.model.generation_config
        if kwargs.get("cache_implementation", getattr(config, "cache_implementation", None)) is not None:
            return False
        return kwargs.get("use_cache", getattr(config, "use_cache", True)) is not False

    def _check_positions(self, args: tuple, kwargs: dict) -> None:
        """Warn once per guard when a call would run past the positions the text backbone was trained
        on (its rotary positions go on, and its answers degrade there, for every method)."""
        limit = getattr(self.adapter.text_config, "max_position_embeddings", None)
        ids = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs"), *args[:1]) if v is not None), None)
        if self._warned_positions or not limit or not isinstance(ids, torch.Tensor):
            return
        config = kwargs.get("generation_config") or self.model.generation_config
        new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        total = ids.shape[-1] + new if new is not None else kwargs.get("max_length") or config.max_length or 0
        if total > limit:
            self._warned_positions = True
            warnings.warn(
                f"this call may run to {total} tokens (a prompt of {ids.shape[-1]} and up to "
                f"{total - ids.shape[-1]} new), past the {limit} positions the model was trained on: its answers "
                "degrade there, with or without halluguard; lower max_new_tokens",
                UserWarning,
                stacklevel=4,
            )

    def _num_beams(self, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.model.generation_config
        return kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1

    def _check_decoding(self, kwargs: dict) -> None:
        """Refuse, before anything runs, a decoding a method cannot run (``Method.decoding_refusal``)."""
        config = kwargs.get("generation_config") or self.model.generation_config
        do_sample = bool(kwargs.get("do_sample", getattr(config, "do_sample", False)))
        check_decoding(self.methods, self._num_beams(kwargs), do_sample)

    def _check_beams_apart(self, kwargs: dict) -> None:
        """Refuse beam search where a contrast branch would run apart (a static or caller-supplied
        cache): it is fed the main rows' tokens forward by forward and cannot follow the beams'
        reordering, which the default cache's row blocks do."""
        contrastive = [m.name for m in self.methods if m.edits_next_logits]
        if self._num_beams(kwargs) > 1 and contrastive:
            raise ValueError(
                f"{', '.join(contrastive)} with beam search needs generate's default cache (the contrast "
                "branch rides along as cache rows that follow the beams); with a static or caller-supplied "
                "cache the branch runs apart and cannot follow them: drop cache_implementation and the cache argument "
                "or use greedy or sampling"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """One guarded forward pass over a prompt (a prefill), e.g. to score answers directly."""
        self._check_wrapped()
        if not self.methods:
            return self.model(*args, **kwargs)
        with self._call(args, kwargs, for_generation=False) as session:
            acting = [
                m.name
                for m in self.methods
                if m.logits_processors(session.main) or m.owns_loop or m.edits_next_logits or m.augments_next_logits
            ]
            if acting:
                raise ValueError(
                    f"{', '.join(acting)} act(s) on next-token scores or own the decoding loop (e.g. PAI's "
                    "guidance branch); Guard.forward returns one forward's raw logits, so use generate "
                    "(e.g. with max_new_tokens=1, output_scores=True) to score with them"
                )
            return self.model(*args, **kwargs)

    def _check_wrapped(self) -> None:
        if not self.wrapped:
            raise RuntimeError("this guard was unwrapped; wrap the model again to guard it")

    def __repr__(self) -> str:
        names = "+".join(m.name for m in self.methods) or "none"
        status = "wrapped" if self.wrapped else "unwrapped"
        return f"Guard({type(self.model).__name__}, methods={names}, {status})"


def _build_methods(spec: Any) -> list[Method]:
    items = registry.parse_methods(spec)
    names = [i.name for i in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"method(s) {repeated} given more than once; compose distinct methods")
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
    registry.check_composition(methods)
    return methods


def check_decoding(methods: Any, num_beams: int, do_sample: bool) -> None:
    """Raise ``ValueError`` if ``methods`` (a spec as ``wrap`` takes, or ``Method`` objects) cannot be
    composed, or cannot decode with ``num_beams`` beams and ``do_sample``: what a guarded ``generate``
    would refuse, known before a model runs."""
    for method in _build_methods(methods):
        refusal = method.decoding_refusal(num_beams, do_sample)
        if refusal is not None:
            raise ValueError(f"{method.name}: {refusal}")


def wrap(model: nn.Module, processor: Any = None, methods: Any = ()) -> Guard:
    """Guard ``model.generate`` with ``methods``; returns the ``Guard`` handle.

    ``methods``: a name (``"vhr"``), a ``+``-joined composition (``"vhr+var"``), a config object
    (``VHRConfig(alpha=2)``), a ``Method`` instance, or a list of these; ``[]`` changes nothing.
    ``processor`` is optional (image positions come from ``input_ids`` and the model config).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap needs a transformers model, got {type(model).__name__}")
    if not isinstance(model, GenerationMixin):
        raise TypeError(
            f"wrap needs the model that generates (a ...ForConditionalGeneration), got {type(model).__name__}; "
            "pass the outer model, not its inner model or language model"
        )
    if isinstance(processor, (str, MethodConfig, Method, list, tuple)):
        raise TypeError(
            f"wrap's second argument is the processor, got {processor!r}; pass methods by name: "
            f"wrap(model, processor, methods={processor!r}) or wrap(model, methods={processor!r})"
        )
    existing = getattr(model, GUARD_ATTRIBUTE, None)
    if existing is not None:
        raise ValueError(f"this model is already wrapped ({existing!r}); call unwrap() on that guard first")
    compat.warn_if_untested()
    adapter = adapter_for(model, processor)
    built = _build_methods(methods)
    for method in built:
        method.setup(adapter)
    guard = Guard(model, processor, built, adapter)
    guard._install()
    return guard


__all__ = ["Guard", "check_decoding", "wrap"]
