"""What a decode step costs in operations: a device-independent measure of a method's overhead.

Counted over whole ``generate`` calls, the way the bench times them (greedy, ``min_new_tokens``):

* aten operations: every operation that reaches PyTorch's dispatcher below Python (counted by a
  ``TorchDispatchMode``); on a GPU each is at least one kernel launch and its host time, on CPU
  each costs its dispatch;
* launches of halluguard's Triton kernels (their pre-run hooks; none on the reference path).

A run of 1 new token is the prompt phase; a run of ``1 + N`` tokens less it, over ``N``, is the cost
per decoded token; a method's extra per layer per step is its cost per token less plain
decoding's, over the text backbone's layers. Unlike times, the counts do not move with the
machine's load.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from halluguard.kernels._compat import interpreting


def _in_triton_interpreter() -> bool:
    """Whether the calling Python code runs inside Triton's interpreter (a kernel launched on CPU)."""
    frame = sys._getframe(2)
    while frame is not None:
        if _INTERPRETER in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


_INTERPRETER = os.path.join("triton", "runtime", "interpreter")


class AtenCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active (``count``). Operations that Triton's
    interpreter dispatches while it runs a kernel on CPU (``TRITON_INTERPRET=1``) are not counted: on a
    GPU the launch is one launch, counted as such."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.interpreting = interpreting()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (self.interpreting and _in_triton_interpreter()):
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclasses.dataclass(frozen=True)
class Counts:
    """Operations of one run: aten operations and Triton launches."""

    aten: int
    launches: int


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """A generation's operations: its prompt phase, and per decoded token."""

    prompt: Counts
    aten_per_token: float
    launches_per_token: float

    def extra_per_layer_step(self, plain: StepCounts, layers: int) -> float:
        """Aten operations per layer per decode step over ``plain``'s."""
        return (self.aten_per_token - plain.aten_per_token) / layers


def count(run: Callable[[], object]) -> Counts:
    """The operations ``run()`` dispatches (without gradients)."""
    from halluguard.kernels.decode_attention import counting_launches

    counter = AtenCounter()
    with torch.no_grad(), counting_launches() as launches, counter:
        run()
    return Counts(counter.count, launches[0])


def step_counts(generate: Callable[[int], object], new_tokens: int) -> StepCounts:
    """The operations of ``generate(n)`` (a generation of ``n`` new tokens): at ``n = 1`` (the prompt
    phase) and per token from ``n = 1 + new_tokens``."""
    if new_tokens < 1:
        raise ValueError(f"counting operations per token needs at least one decoded token, got {new_tokens}")
    prompt = count(lambda: generate(1))
    full = count(lambda: generate(1 + new_tokens))
    return StepCounts(
        prompt=prompt,
        aten_per_token=(full.aten - prompt.aten) / new_tokens,
        launches_per_token=(full.launches - prompt.launches) / new_tokens,
    )
