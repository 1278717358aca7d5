"""Triton when it is installed; otherwise stand-ins that let the kernel modules import.

The stand-ins only make the ``@triton.jit`` definitions and their ``tl.constexpr`` annotations
evaluate; launching a kernel without Triton is refused by the launchers (``require_triton``).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False

    class _Language:
        @staticmethod
        def constexpr(value=None):
            return value

    class _Triton:
        @staticmethod
        def jit(fn):
            return fn

    triton, tl = _Triton(), _Language()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host integers (Triton's own helper also takes ``constexpr`` values, at several
    times the cost per call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of 2 at least ``n`` (1 for ``n <= 1``), of a host integer."""
    return 1 << max(n - 1, 0).bit_length()


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the triton package (pip install triton)")


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (``TRITON_INTERPRET=1``)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
