"""Method configuration: one dataclass per method, validated, serialisable.

Every field of a method config is declared with :func:`param`, which records its documentation
and the values it accepts. ``MethodConfig.__post_init__`` checks each field against that record,
so a bad value fails at construction with a ``ValueError`` that names the field and the allowed
range. Configs round-trip through ``to_dict``/``from_dict`` (and JSON), and every config class
knows its *neutral* point: the setting at which the method leaves generation unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar


def param(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple | None = None,
    optional: bool = False,
    kind: type | tuple[type, ...] | None = None,
) -> Any:
    """Declare a config field with its documentation and its allowed values.

    ``low``/``high`` bound numbers (``*_open`` makes a bound exclusive); ``choices`` lists the
    allowed values; ``optional`` admits ``None``; ``kind`` is the expected type (inferred from the
    default when omitted). Lists are stored as tuples; element types of tuple and dict fields are
    checked by the config's ``validate``.
    """
    if isinstance(default, list):
        default = tuple(default)
    meta = {
        "doc": doc,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": choices,
        "optional": optional or default is None,
        "kind": kind if kind is not None else _kind_of(default),
    }
    if isinstance(default, (dict, tuple)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _kind_of(value: Any) -> type | tuple[type, ...] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return bool
    if isinstance(value, float):
        return (int, float)
    return type(value)


def _describe_range(meta: dict) -> str:
    if meta["choices"] is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        left = "(" if meta["low_open"] else "["
        right = ")" if meta["high_open"] else "]"
        return f"a number in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"a finite number {'>' if meta['low_open'] else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if meta['high_open'] else '<='} {high:g}"
    return "a finite number"


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method configuration.

    Subclasses set ``name`` (the registry key, e.g. ``"vhr"``) and ``neutral_overrides`` (the field
    values at which the method changes nothing), and declare their fields with :func:`param`.
    """

    name: ClassVar[str] = ""
    neutral_overrides: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            self._check_field(f, value)
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_validated", False):
            raise AttributeError(
                f"{type(self).__name__} is immutable once validated; make a changed copy with .replace({name}=...)"
            )
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ``ValueError`` naming the fields."""

    def _check_field(self, f: dataclasses.Field, value: Any) -> None:
        meta = f.metadata
        if not meta:
            return
        where = f"{type(self).__name__}.{f.name}"
        if value is None:
            if not meta["optional"]:
                raise ValueError(f"{where} must not be None; expected {_describe_range(meta)}")
            return
        kind = meta["kind"]
        numeric = kind in (int, (int, float))
        if kind is not None and (not isinstance(value, kind) or (numeric and isinstance(value, bool))):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise ValueError(f"{where} must be {expected}, got {value!r}")
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                raise ValueError(f"{where} is {value!r}; allowed: {_describe_range(meta)}")
            return
        if isinstance(value, (tuple, dict)):
            items = value.values() if isinstance(value, dict) else value
            numbers = [v for v in items if isinstance(v, float)]
            if any(not math.isfinite(v) for v in numbers):
                raise ValueError(f"{where} holds a non-finite number: {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = meta["low"], meta["high"]
            bad = (
                (isinstance(value, float) and not math.isfinite(value))
                or (low is not None and (value <= low if meta["low_open"] else value < low))
                or (high is not None and (value >= high if meta["high_open"] else value > high))
            )
            if bad:
                raise ValueError(f"{where} is {value!r}; allowed: {_describe_range(meta)}")

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"method": name, <field>: value, ...}``."""
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Build from ``to_dict`` output; unknown keys are an error, missing keys take defaults."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping of field names to values, got {data!r}")
        data = dict(data)
        method = data.pop("method", cls.name)
        if method != cls.name:
            raise ValueError(f"{cls.__name__}.from_dict got a config for method {method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MethodConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def neutral(cls) -> "MethodConfig":
        """The config at the strength where the method leaves generation unchanged."""
        return cls(**cls.neutral_overrides)

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(field, default, documentation) for every field, for help texts."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, default, f.metadata.get("doc", "")))
        return rows
