"""The method registry: the one place that maps a method name to its config and implementation.

``halluguard.methods.configs`` calls :func:`register_method` once per method (a method defined
elsewhere registers itself the same way). ``wrap`` resolves names,
``"a+b"`` compositions and config objects through this table.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MethodConfig

if TYPE_CHECKING:
    from .methods.base import Method


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type[MethodConfig]
    # the Method class, its import path "module:Class" (imported on first use), or None: the config is
    # defined, the implementation is not shipped yet
    implementation: type[Method] | str | None
    summary: str

    @property
    def available(self) -> bool:
        return self.implementation is not None

    @property
    def method_cls(self) -> type[Method] | None:
        if isinstance(self.implementation, str):
            module, _, name = self.implementation.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.implementation


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(
    name: str, config_cls: type[MethodConfig], implementation: type[Method] | str | None, summary: str
) -> None:
    """Register a method under ``name``: its config class and its ``Method`` class (or the import path
    ``"module:Class"`` of one, imported on first use; None while only the config exists)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if config_cls.name != name:
        raise ValueError(f"{config_cls.__name__}.name is {config_cls.name!r}, expected {name!r}")
    _REGISTRY[name] = MethodEntry(name, config_cls, implementation, summary)


# Pairs of decoding-loop owners whose combination is defined and tested (none yet).
COMPOSABLE_LOOP_OWNERS: frozenset[frozenset[str]] = frozenset()
# The methods each decoding-loop owner composes with, defined and tested (tests/test_opera.py): they act
# inside the loop's forwards on every query row (OPERA forwards several candidate tokens per row, so a
# method that edits only a call's last query row, PAI, would reach one candidate of each beam).
LOOP_OWNER_COMPANIONS: dict[str, frozenset[str]] = {
    "opera": frozenset({"vhr", "var"}),
    "lookback": frozenset(),  # guided decoding (its detection composes with every method)
}


def check_composition(methods: list[Method]) -> None:
    """Refuse compositions that are not defined: two methods that each own the decoding loop, or two
    contrastive methods (each would contrast the other's already contrasted logits)."""
    contrastive = [m.name for m in methods if m.edits_next_logits]
    if len(contrastive) > 1:
        raise ValueError(
            f"cannot compose {' and '.join(repr(n) for n in contrastive)}: each contrasts the next-token "
            "logits with its own branch, and no combination of two contrasts is defined"
        )
    owners = [m for m in methods if m.owns_loop]
    if owners and contrastive:
        raise ValueError(
            f"cannot compose {owners[0].name!r} with {contrastive[0]!r}: {owners[0].name} runs its own decoding "
            "loop, whose rows a contrast branch cannot follow"
        )
    for owner in owners:
        if owner.name not in LOOP_OWNER_COMPANIONS:  # a loop of the user's own: theirs to compose
            continue
        companions = LOOP_OWNER_COMPANIONS[owner.name]
        others = [m.name for m in methods if not m.owns_loop and m.name not in companions and m.name in _REGISTRY]
        if others:
            raise ValueError(
                f"cannot compose {owner.name!r} with {others[0]!r}: {owner.name} runs its own decoding loop, and the "
                f"methods defined and tested inside it are {sorted(companions) or 'none'}"
            )
    for i, a in enumerate(owners):
        for b in owners[i + 1 :]:
            if frozenset((a.name, b.name)) not in COMPOSABLE_LOOP_OWNERS:
                raise ValueError(
                    f"cannot compose {a.name!r} with {b.name!r}: both take over the decoding loop and no "
                    "combination of the two is defined"
                )


def _ensure_loaded() -> None:
    from . import methods  # noqa: F401  (importing the package registers every method)


def entry(name: str) -> MethodEntry:
    _ensure_loaded()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_methods(available_only: bool = False) -> list[str]:
    """Names of the registered methods (``available_only``: those with an implementation)."""
    _ensure_loaded()
    return sorted(n for n, e in _REGISTRY.items() if e.available or not available_only)


def get_config(name: str, **overrides: Any) -> MethodConfig:
    """The config of method ``name`` with its paper defaults, some fields overridden."""
    return entry(name).config_cls.from_dict(overrides)


def configs_from_spec(
    spec: str, overrides: Any = None, *, method_option: str = "methods", config_option: str = "config"
):
    """Configs for ``spec`` (``"a+b"``, ``""`` or ``"none"``: no method) with overrides: a dict or its
    JSON text (or a JSON file's path), ``{"field": v}`` for one method or ``{"name": {"field": v}}`` per
    method. Errors are ``ValueError``s that name the options as the caller calls them."""
    names = [n.strip() for n in spec.split("+") if n.strip() and n.strip() != "none"]
    if overrides is None:
        try:
            return [get_config(n) for n in names]
        except ValueError as err:
            raise ValueError(f"{method_option}: {err}") from None
    if not names:
        raise ValueError(f"{config_option} needs {method_option} (the method whose fields it sets)")
    data = overrides
    if isinstance(overrides, str):
        path = Path(overrides)
        try:
            is_file = path.is_file()
        except OSError:  # JSON text too long to be a file name
            is_file = False
        try:
            data = json.loads(path.read_text() if is_file else overrides)
        except json.JSONDecodeError as err:
            where = f"file {path}" if is_file else "text"
            raise ValueError(f"{config_option}: the {where} is not valid JSON ({err}) and names no file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_option} must be a JSON object of fields, got {type(data).__name__}")
    per_method = data and set(data) <= set(names) and all(isinstance(v, dict) for v in data.values())
    if not per_method:
        if len(names) != 1:
            raise ValueError(
                f"with several methods, {config_option} must map each method name ({', '.join(names)}) to its fields"
            )
        data = {names[0]: data}
    try:
        return [get_config(n, **data.get(n, {})) for n in names]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_option}: {err}") from None


def method_beams(configs: list) -> int:
    """The beam count a composition runs with when a call names none: a beam-search method's own
    (OPERA's ``num_beams``), else 1."""
    return next((int(c.num_beams) for c in configs if getattr(c, "num_beams", None)), 1)


def parse_methods(spec: Any) -> list[Any]:
    """Flatten a method spec into a list of configs (and ready-made ``Method`` objects).

    Accepted: a name (``"vhr"``), a ``+``-joined composition (``"vhr+opera"``), a config object,
    a ``Method`` instance, ``None`` or a list/tuple of any of these.
    """
    from .methods.base import Method

    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        return [item for part in spec for item in parse_methods(part)]
    if isinstance(spec, str):
        names = [p for p in (s.strip() for s in spec.split("+")) if p]
        if not names:
            raise ValueError(f"empty method spec {spec!r}")
        return [entry(n).config_cls() for n in names]
    if isinstance(spec, (MethodConfig, Method)):
        return [spec]
    raise TypeError(f"cannot interpret {spec!r} as a method: give a name, 'a+b', a config or a list")
