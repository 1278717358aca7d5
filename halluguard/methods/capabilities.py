"""What a method can do, declared once, where the method is registered.

Every method's package declares a ``MethodEntry``: its name, config class, implementation (the
``"module:Class"`` path, imported on first use, so reading an entry loads neither torch nor
transformers) and its ``Capabilities``. ``wrap``'s checks, the command line, the demo, the
lmms-eval model and the tests all read them from there (``registry.entry(name).capabilities_for(config)``
or ``method.capabilities``); nothing else says what a method can do.

Capabilities that depend on the settings (Lookback Lens owns the loop only in ``mode="guide"``;
OPERA's beam count is a field) are declared as a function of the config.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from ..config import MethodConfig

SAMPLING = ("any", "never", "always")
BEAMS = ("any", "one", "several")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a method can do and needs.

    ``owns_loop``            it replaces ``generate``'s decoding loop (``Method.generate_loop``);
    ``contrasts``            it changes the next-token logits with a contrast branch of its own
                             (``Method.next_token_logits``): two such methods do not compose;
    ``beams``                ``"any"``; ``"one"``: beam search is refused; ``"several"``: it is a beam search;
    ``sampling``             ``"any"``; ``"never"``: sampling is refused; ``"always"``: greedy search is refused;
    ``beams_reason``         why beam search is refused (``"one"``) or needed (``"several"``), as a refusal says it;
    ``sampling_reason``      the same for sampling (``"never"``) or greedy search (``"always"``);
    ``generation_defaults``  generate arguments the official runs use: the decoding ones applied when
                             a call sets none of them, a length (``max_new_tokens``) when it sets none;
    ``acts_in_branches``     an attention-level method that also acts in other methods' contrast
                             branches, so both sides of a contrast differ only in what it is about;
    ``runs_inside``          the loop owners it composes with (it acts inside their forwards);
    ``late_tokens``          a loop owner whose tokens are final only late says why (no streamer);
    ``required``             ``(field, message)``: a config field that must be set to decode, and
                             the refusal that says how to make it;
    ``needs``                files or tables it reads, in words (shown by ``halluguard methods``).
    """

    owns_loop: bool = False
    contrasts: bool = False
    beams: str = "any"
    sampling: str = "any"
    beams_reason: str = ""
    sampling_reason: str = ""
    generation_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    acts_in_branches: bool = False
    runs_inside: frozenset[str] = frozenset()
    late_tokens: str | None = None
    required: tuple[tuple[str, str], ...] = ()
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.beams not in BEAMS:
            raise ValueError(f"Capabilities.beams is {self.beams!r}; allowed: {BEAMS}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"Capabilities.sampling is {self.sampling!r}; allowed: {SAMPLING}")
        object.__setattr__(self, "runs_inside", frozenset(self.runs_inside))

    def describe(self) -> list[str]:
        """The capabilities in words, one line each (``halluguard methods -v``)."""
        beams = {"any": "any beams", "one": "no beam search", "several": "beam search only"}[self.beams]
        sampling = {"any": "greedy or sampling", "never": "no sampling", "always": "sampling only"}[self.sampling]
        lines = [f"decoding: {beams}; {sampling}"]
        if self.owns_loop:
            lines.append("owns the decoding loop" + (f" ({self.late_tokens}: no streamer)" if self.late_tokens else ""))
        if self.contrasts:
            lines.append("contrasts the next-token logits with a branch of its own")
        if self.acts_in_branches:
            lines.append("acts in other methods' contrast branches too")
        if self.runs_inside:
            lines.append(f"runs inside the decoding loop of: {', '.join(sorted(self.runs_inside))}")
        if self.generation_defaults:
            lines.append(f"generate defaults (official runs): {dict(self.generation_defaults)}")
        lines += [f"needs {need}" for need in self.needs]
        return lines

    def decoding_refusal(self, config: Any, num_beams: int, do_sample: bool) -> str | None:
        """Why a method with these capabilities and ``config`` cannot decode with ``num_beams`` beams
        and ``do_sample`` (None: it can)."""
        for field, message in self.required:
            if getattr(config, field, None) is None:
                return message
        if self.sampling == "never" and do_sample:
            return f"{self.sampling_reason}: pass do_sample=False"
        if self.sampling == "always" and not do_sample:
            return f"{self.sampling_reason}: pass do_sample=True"
        if self.beams == "several" and num_beams < 2:
            official = self.generation_defaults.get("num_beams")
            hint = f" (the official setting is {official})" if official else ""
            return f"{self.beams_reason}: pass num_beams>=2{hint}"
        if self.beams == "one" and num_beams > 1:
            return f"cannot follow beam search ({self.beams_reason}): use greedy search or sampling"
        return None


Declared = Capabilities | Callable[[MethodConfig], Capabilities]


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """A registered method: ``implementation`` is the ``Method`` class, its import path
    ``"module:Class"`` (imported on first use), or None (the config is defined, the implementation is
    not shipped yet); ``capabilities`` a ``Capabilities`` or a function of the config giving them (None:
    those the implementation class declares)."""

    name: str
    config_cls: type[MethodConfig]
    implementation: type | str | None  # a halluguard.methods.base.Method subclass
    summary: str
    capabilities: Declared | None = None

    def __post_init__(self) -> None:
        if self.config_cls.name != self.name:
            raise ValueError(f"{self.config_cls.__name__}.name is {self.config_cls.name!r}, expected {self.name!r}")

    @property
    def available(self) -> bool:
        return self.implementation is not None

    @property
    def method_cls(self) -> type | None:
        cls = self.implementation
        if isinstance(cls, str):
            module, _, name = cls.partition(":")
            cls = getattr(importlib.import_module(module), name)
        if cls is not None and self.capabilities is not None and cls.capabilities is not self.capabilities:
            raise TypeError(
                f"{cls.__name__}.capabilities must be the ones registered for {self.name!r} (declare them once)"
            )
        return cls

    def capabilities_for(self, config: MethodConfig | None = None) -> Capabilities:
        """The capabilities of the method with ``config`` (its defaults when None)."""
        declared = self.capabilities
        if declared is None:
            declared = self.method_cls.capabilities if self.available else Capabilities()
        return resolve(declared, config if config is not None else self.config_cls())


def resolve(declared: Declared, config: MethodConfig) -> Capabilities:
    """``declared`` for ``config``: a ``Capabilities`` as it is, a function of the config called."""
    return declared if isinstance(declared, Capabilities) else declared(config)
