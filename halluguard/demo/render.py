"""How the demo looks in a terminal (rich): the picture as coloured half blocks, answers with their
object words marked, and plain and guarded answers side by side."""

from __future__ import annotations

import re

from rich.table import Table
from rich.text import Text

from .core import Answer, Turn

STYLES = {
    "only": "bold yellow",  # an object word this side names and the other does not
    "hallucinated": "bold red strike",  # names an object the scene does not hold
    "flagged": "on magenta",  # a token run Lookback Lens flags
}


def preview(image, width: int = 36) -> Text:
    """The image as ``width`` columns of half-block characters (two pixel rows per text row)."""
    height = max(2, round(image.height * width / image.width / 2) * 2)
    small = image.convert("RGB").resize((width, height))
    pixels = small.load()
    text = Text()
    for y in range(0, height, 2):
        for x in range(width):
            top, bottom = pixels[x, y], pixels[x, y + 1]
            text.append("▀", style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bottom[0]},{bottom[1]},{bottom[2]})")
        text.append("\n")
    return text


def answer_text(answer: Answer | None, turn: Turn, side: str, chair) -> Text:
    """The answer with flagged tokens, object words only this side names, and hallucinated words marked
    (a legend-free reading: styles plus ``[!]`` after hallucinated words, so it reads without colour)."""
    if answer is None:
        return Text("")
    text = Text()
    for index, piece in enumerate(answer.pieces):
        flagged = any(start <= index < end for start, end in answer.flagged)
        text.append(piece, style=STYLES["flagged"] if flagged else "")
    lead = len(text.plain) - len(text.plain.lstrip())
    text = text[lead:]
    text.rstrip()
    only, wrong = turn.only(side), turn.hallucinated(answer)
    marks = []
    for match in re.finditer(r"[A-Za-z]+", text.plain):
        node = _node(chair, match.group())
        if node is None:
            continue
        if node in wrong:
            text.stylize(STYLES["hallucinated"], match.start(), match.end())
            marks.append(match.end())
        elif node in only:
            text.stylize(STYLES["only"], match.start(), match.end())
    if marks:
        parts = text.divide(marks)
        marked = Text()
        for k, part in enumerate(parts):
            marked.append_text(part)
            if k < len(marks):
                marked.append("[!]", style="red")
        text = marked
    if answer.stopped:
        text.append(" [stopped]", style="dim")
    return text


def _node(chair, word: str) -> str | None:
    normal = chair.normalise(word.lower())
    return chair.inverse.get(normal)


def comparison(turn: Turn, chair) -> Table:
    table = Table(expand=True, show_lines=False)
    sides = [s for s in ("plain", "guarded") if getattr(turn, s) is not None]
    for side in sides:
        table.add_column("plain" if side == "plain" else f"guarded: {turn.methods}", ratio=1)
    table.add_row(*(answer_text(getattr(turn, side), turn, side, chair) for side in sides))
    return table


def summary(turn: Turn) -> Text:
    """One line per difference: what only one side names, what is hallucinated."""
    lines = Text()
    if turn.plain is not None and turn.guarded is not None:
        for side in ("plain", "guarded"):
            only = sorted(turn.only(side))
            if only:
                lines.append(f"only {side}: {', '.join(only)}\n", style=STYLES["only"])
        if not turn.only("plain") and not turn.only("guarded"):
            lines.append("both name the same objects\n", style="dim")
    for side in ("plain", "guarded"):
        answer = getattr(turn, side)
        if answer is not None and answer.flagged:
            runs = ["".join(answer.pieces[start:end]).strip() for start, end in answer.flagged]
            lines.append(
                f"{side}, flagged by Lookback Lens: " + "; ".join(f'"{r}"' for r in runs) + "\n", style="magenta"
            )
    if turn.truth is not None:
        for side in ("plain", "guarded"):
            answer = getattr(turn, side)
            if answer is not None:
                wrong = sorted(turn.hallucinated(answer))
                label = f"{side} hallucinates: {', '.join(wrong)}" if wrong else f"{side}: no hallucinated object"
                lines.append(label + "\n", style="red" if wrong else "green")
    return lines
