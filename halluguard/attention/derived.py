"""Tensors made once from tensors that many attention calls share (a forward's mask, a method's edit tensors)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence
from typing import Any

PER_LAYER = 128  # values to keep of a name whose sources differ from layer to layer (one per layer of any model)


class Derived:
    """Tensors derived from tensors that many attention calls share, made once while those are the same.

    ``get(name, sources, make, key)`` returns the value made for these very ``sources`` (compared by
    identity, and kept alive by the entry, so an identity is never reused while it is kept) and an
    equal ``key`` (the shapes or settings the value also depends on), or makes it. A few values are
    kept per name, the most recently used (``keep``, default ``per_name``): the layers of a forward
    share its mask and a method's per-forward edit tensors, and models whose layers alternate two
    masks keep both; a name whose sources differ per layer keeps ``PER_LAYER``."""

    per_layer = PER_LAYER  # (read by the kernel's workspace use)

    def __init__(self, per_name: int = 4):
        self.per_name = per_name
        self._kept: dict[str, collections.OrderedDict] = {}

    def get(
        self, name: str, sources: Sequence[Any], make: Callable[[], Any], key: Hashable = None, keep: int | None = None
    ) -> Any:
        entries = self._kept.setdefault(name, collections.OrderedDict())
        index = (key, *map(id, sources))
        entry = entries.get(index)
        if entry is not None and all(a is b for a, b in zip(entry[0], sources)):
            entries.move_to_end(index)
            return entry[1]
        value = make()
        entries[index] = (tuple(sources), value)
        entries.move_to_end(index)
        while len(entries) > (keep or self.per_name):
            entries.popitem(last=False)
        return value

    def kept(self, name: str) -> int:
        """How many values ``name`` keeps."""
        return len(self._kept.get(name, ()))
