"""A Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the signal lands. Where that is a finalizer (a ``__del__``
the garbage collector runs in the middle of an import, say) or a C routine that clears errors, the
exception is swallowed and the work goes on as if nothing had happened; where it is a C extension's
initialisation, it turns into an ``ImportError``. ``Interrupts`` records every Ctrl-C as well as
raising it: ``check()`` raises it again at a safe point (between batches), and the command line
treats a run during which one was recorded as interrupted, whatever became of the exception.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupts:
    """Within ``with Interrupts() as interrupts:`` Ctrl-C raises ``KeyboardInterrupt`` and is counted."""

    def __init__(self):
        self.count = 0
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a Ctrl-C came (even one that something swallowed)."""
        if self.count:
            raise KeyboardInterrupt
