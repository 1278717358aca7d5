"""The method registry: the one place that maps a method name to its entry (config, implementation,
capabilities).

Every built-in method declares its entry in its own package (``halluguard.methods.<name>.ENTRY``);
the registry starts with those (``halluguard.methods.BUILTIN``), and a method defined elsewhere joins
with :func:`register_method`. ``wrap`` resolves names, ``"a+b"`` compositions and config objects
through this table, and checks compositions against the capabilities declared there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import MethodConfig
from .methods import BUILTIN
from .methods.base import Method
from .methods.capabilities import Declared, MethodEntry

_REGISTRY: dict[str, MethodEntry] = {entry.name: entry for entry in BUILTIN}


def register_method(
    name: str,
    config_cls: type[MethodConfig],
    implementation: type[Method] | str | None,
    summary: str,
    capabilities: Declared | None = None,
) -> None:
    """Register a method under ``name``: its config class, its ``Method`` class (or the import path
    ``"module:Class"`` of one, imported on first use; None while only the config exists) and its
    capabilities (None: those the class declares)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = MethodEntry(name, config_cls, implementation, summary, capabilities)


def check_composition(methods: list[Method]) -> None:
    """Refuse compositions that are not defined: two contrastive methods (each would contrast the
    other's already contrasted logits), a loop owner with a contrast or with a method that does not
    declare it runs inside that loop (``Capabilities.runs_inside``; a method of the user's own, not
    registered, is theirs to compose), or two loop owners."""
    contrastive = [m.name for m in methods if m.capabilities.contrasts]
    if len(contrastive) > 1:
        raise ValueError(
            f"cannot compose {' and '.join(repr(n) for n in contrastive)}: each contrasts the next-token "
            "logits with its own branch, and no combination of two contrasts is defined"
        )
    owners = [m for m in methods if m.capabilities.owns_loop]
    if owners and contrastive:
        raise ValueError(
            f"cannot compose {owners[0].name!r} with {contrastive[0]!r}: {owners[0].name} runs its own decoding "
            "loop, whose rows a contrast branch cannot follow"
        )
    if len(owners) > 1:
        raise ValueError(
            f"cannot compose {owners[0].name!r} with {owners[1].name!r}: both take over the decoding loop and no "
            "combination of the two is defined"
        )
    for owner in owners:
        if owner.name not in _REGISTRY:  # a loop of the user's own: theirs to compose
            continue
        others = [
            m
            for m in methods
            if m is not owner and m.name in _REGISTRY and owner.name not in m.capabilities.runs_inside
        ]
        if others:
            inside = sorted(n for n, e in _REGISTRY.items() if owner.name in _runs_inside(e))
            raise ValueError(
                f"cannot compose {owner.name!r} with {others[0].name!r}: {owner.name} runs its own decoding loop, "
                f"and the methods defined and tested inside it are {inside or 'none'}"
            )


def _runs_inside(entry: MethodEntry) -> frozenset[str]:
    return entry.capabilities_for().runs_inside


def entry(name: str) -> MethodEntry:
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_methods(available_only: bool = False) -> list[str]:
    """Names of the registered methods (``available_only``: those with an implementation)."""
    return sorted(n for n, e in _REGISTRY.items() if e.available or not available_only)


def get_config(name: str, **overrides: Any) -> MethodConfig:
    """The config of method ``name`` with its paper defaults, some fields overridden."""
    return entry(name).config_cls.from_dict(overrides)


def spec_names(spec: str) -> list[str]:
    """The method names of a spec (``"a+b"``; ``""`` and ``"none"`` name none)."""
    return [n.strip() for n in spec.split("+") if n.strip() and n.strip() != "none"]


def overrides_by_method(
    spec: str, overrides: Any, *, method_option: str = "methods", config_option: str = "config"
) -> dict[str, dict]:
    """``overrides`` (see :func:`configs_from_spec`) as ``{"name": {"field": v}}`` for ``spec``'s methods."""
    names = spec_names(spec)
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
    return data


def configs_from_spec(
    spec: str, overrides: Any = None, *, method_option: str = "methods", config_option: str = "config"
):
    """Configs for ``spec`` (``"a+b"``, ``""`` or ``"none"``: no method) with overrides: a dict or its
    JSON text (or a JSON file's path), ``{"field": v}`` for one method or ``{"name": {"field": v}}`` per
    method. Errors are ``ValueError``s that name the options as the caller calls them."""
    names = spec_names(spec)
    if overrides is None:
        try:
            return [get_config(n) for n in names]
        except ValueError as err:
            raise ValueError(f"{method_option}: {err}") from None
    data = overrides_by_method(spec, overrides, method_option=method_option, config_option=config_option)
    try:
        return [get_config(n, **data.get(n, {})) for n in names]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_option}: {err}") from None


def method_beams(configs: list) -> int:
    """The beam count a composition runs with when a call names none: the one a method's capabilities
    set as a generation default (OPERA's ``num_beams``), else 1."""
    for config in configs:
        declared = _REGISTRY.get(config.name)
        beams = declared.capabilities_for(config).generation_defaults.get("num_beams") if declared else None
        if beams:
            return int(beams)
    return 1


def parse_methods(spec: Any) -> list[Any]:
    """Flatten a method spec into a list of configs (and ready-made ``Method`` objects).

    Accepted: a name (``"vhr"``), a ``+``-joined composition (``"vhr+opera"``), a config object,
    a ``Method`` instance, ``None`` or a list/tuple of any of these.
    """
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
