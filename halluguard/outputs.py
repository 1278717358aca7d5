"""Files the commands write, checked before any work starts.

A folder where a file is due, a folder that does not exist, or a picture format no writer knows is
answered in one line before a model loads or a measurement runs, not after it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path


def output_file(path: str, option: str = "--out") -> Path:
    """``path`` as a file that can be written: not a folder, in a folder that exists."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {target.parent} does not exist")
    return target


@functools.cache
def picture_formats() -> tuple[str, ...]:
    """The file extensions matplotlib writes pictures in (png, pdf, svg, jpg, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return tuple(sorted(FigureCanvasAgg(Figure()).get_supported_filetypes()))


def picture_file(path: str, option: str) -> Path:
    """``path`` as a picture file that can be written, its format named by its extension."""
    target = output_file(path, option)
    if target.suffix.lower().lstrip(".") not in picture_formats():
        known = ", ".join(f".{s}" for s in picture_formats())
        got = f"'{target.suffix}'" if target.suffix else "no extension"
        raise ValueError(f"{option} {path}: a picture file ends in one of {known} ({got} given)")
    return target


def write_through_temporary(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` to a temporary file beside ``path``, then rename it to ``path``: a reader
    sees the old file or the whole new one, and an interrupted write leaves nothing behind."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    write_through_temporary(path, lambda temp: temp.write_text(text))
