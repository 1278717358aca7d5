"""``halluguard demo``: the interactive session and its one-shot mode.

The session reads lines with the standard library's ``readline`` (line editing and history in any
terminal, pseudo-terminals included, and no extra dependency; it falls back to plain input where the
platform lacks it) and draws with rich. A line is a question about the picture (an empty line asks
for a caption) or a command:

    :image PATH               show the model another picture
    :scene [SPLIT] [INDEX]    a scene of the test model's world (misleading, test, faint); objects known
    :method SPEC [k=v ...]    methods, e.g. vhr, pai+vhr, pai alpha=0.5, pai+vhr vhr.alpha=2; none: plain only
    :set KEY=VALUE ...        max_tokens, beams, sample (on/off), temperature, top_p, seed
    :compare on|off           plain and guarded side by side, or the guarded answer alone
    :attention FILE.png       save the last guarded answer's image-attention map per (layer, head)
    :show                     the picture, methods and settings
    :help                     this list
    :quit                     leave (or Ctrl-D)

Ctrl-C stops a generation and keeps the session. quit, exit, q and help typed alone are those
commands. Lines piped in (``halluguard demo < questions.txt``) are answered one by one as if typed;
the exit status is then 1 when one of them failed.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import render
from .core import Demo, DemoError, Settings, Turn, split_assignment
from .meter import ImageAttentionMeter

# a scene of the shipped test model's misleading split where the plain caption names an undrawn object
DEFAULT_SCENE = "misleading:1"
# words that, typed alone, are the commands a user means rather than questions for the model
BARE_COMMANDS = ("quit", "exit", "q", "help")
HELP = __doc__.split("or a command:", 1)[1].strip("\n")


def load_model(demo: Demo, args) -> None:
    """The model and processor, loaded offline (the test model) or from the hub cache / a path."""
    from transformers.utils import logging

    from halluguard.models import load_model as load

    logging.disable_progress_bar()
    try:
        demo.model, demo.processor, _ = load(args.model, dtype=args.dtype or "auto", device=args.device)
    except Exception as err:  # a model that cannot be loaded is one clear line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DemoError(f"cannot load the model {args.model!r}: {first}") from None


def _scene_args(text: str) -> tuple[str, int]:
    split, _, index = text.partition(":")
    try:
        return split or "misleading", int(index or 0)
    except ValueError:
        raise DemoError(f"--scene takes SPLIT[:INDEX], e.g. misleading:3, not {text!r}") from None


def configure(demo: Demo, args) -> None:
    """Picture, methods and settings from the command line (defaults: a misleading scene and VCD),
    each checked before the model loads; the methods are checked against all the settings."""
    if args.image and args.scene:
        raise DemoError("--image and --scene both name the picture; give one")
    if args.image:
        demo.load_image(args.image)
    elif demo.is_testbed or args.scene:
        demo.load_scene(*_scene_args(args.scene or DEFAULT_SCENE))
    assignments = list(args.set or [])
    if args.max_new_tokens is not None:
        keys = [Settings.ALIASES.get(key, key) for key, _ in map(split_assignment, assignments)]
        if "max_new_tokens" in keys:
            raise DemoError("--max-new-tokens and --set max_tokens=... both set the answer's length; give one")
        assignments.append(f"max_new_tokens={args.max_new_tokens}")
    for assignment in assignments:
        demo.settings.update(assignment)
    if getattr(args, "configs", None) is not None:
        demo.use_configs(args.method, args.configs)
    else:
        demo.set_methods(args.method)
    if args.save_attention:
        picture_path(args.save_attention, "--save-attention")
    demo.compare = True  # interactive; the one-shot mode follows --compare


def picture_path(path: str, option: str) -> str:
    """A picture file the attention map can be written to (checked before any answer)."""
    from halluguard.outputs import picture_file

    try:
        return str(picture_file(path, option))
    except ValueError as err:
        raise DemoError(str(err)) from None


# ---- one shot ---------------------------------------------------------------------------------------------


def run_once(demo: Demo, args, console: Console) -> int:
    if demo.picture is None:
        raise DemoError("no picture: pass --image FILE (or --scene SPLIT:INDEX with the test model)")
    demo.compare = args.compare
    probe = ImageAttentionMeter() if args.save_attention else None
    turn = demo.ask(args.prompt, probe=probe)
    if args.save_attention:
        save_attention(demo, probe, args.save_attention)
    if args.json:
        print(json.dumps(dict(turn.to_dict(), model=demo.name, settings=demo.settings.describe()), indent=1))
        return 0
    console.print(f"[dim]{turn.picture} | {demo.name} | {demo.settings.describe()}[/dim]")
    console.print(render.comparison(turn, demo.chair))
    console.print(render.summary(turn), end="")
    return 0


# ---- the interactive session -------------------------------------------------------------------------------


def interactive(demo: Demo, console: Console) -> int:
    """The session, on a terminal or on lines piped in (each answered as if typed; then the exit status
    is 1 when a line failed)."""
    typing = sys.stdin.isatty()
    if typing:
        _readline()
    console.print(f"[bold]halluguard demo[/bold]: {demo.name}. Type a question, Enter for a caption, :help.")
    _show(demo, console)
    last: Turn | None = None
    failed = False
    while True:
        try:
            line = input("> " if typing else "")
        except EOFError:
            console.print()
            return 1 if failed and not typing else 0
        except KeyboardInterrupt:
            console.print("\n(:quit leaves)")
            continue
        line = line.strip()
        bare = line.lower()
        try:
            if line.startswith((":", "/")) or bare in BARE_COMMANDS:
                if _command(demo, line.lstrip(":/"), console, last) == "quit":
                    return 1 if failed and not typing else 0
                continue
            last = _ask(demo, line, console)
        except KeyboardInterrupt:
            console.print("\n[dim]stopped[/dim]")
        except Exception as err:  # one line, and the session goes on
            failed = True
            text = str(err) if isinstance(err, DemoError) else f"{type(err).__name__}: {err}"
            console.print(f"[red]error:[/red] {(text.strip().splitlines() or [''])[0]}", soft_wrap=True)


def _command(demo: Demo, line: str, console: Console, last: Turn | None) -> str | None:
    """Run one command line (without its ``:``); ``"quit"`` when it ends the session."""
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise DemoError(f"cannot read the command ({err})") from None
    if not words:
        raise DemoError("an empty command; :help lists them")
    name, rest = words[0].lower(), words[1:]
    handler = COMMANDS.get(name)
    if handler is None:
        raise DemoError(f"unknown command :{name}; :help lists the commands")
    return handler(demo, rest, console, last)


def _quit(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> str:
    return "quit"


def _help(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    console.print(HELP)


def _image(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    if len(rest) != 1:
        raise DemoError(":image takes one path")
    demo.load_image(rest[0])
    _show(demo, console)


def _scene(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    if not demo.is_testbed:
        raise DemoError(":scene shows the test model's world; with another model use :image PATH")
    split = rest[0] if rest else "misleading"
    if len(rest) > 2:
        raise DemoError(":scene takes a split and an index, e.g. :scene misleading 3")
    try:
        index = int(rest[1]) if len(rest) > 1 else _next_index(demo, split)
    except ValueError:
        raise DemoError(f"a scene index is a whole number, not {rest[1]!r}") from None
    demo.load_scene(split, index)
    _show(demo, console)


def _method(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    if not rest:
        raise DemoError(":method takes a spec, e.g. :method pai+vhr alpha=... (none: plain only)")
    console.print(f"methods: {demo.set_methods(rest[0], rest[1:])}")


def _set(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    if not rest:
        raise DemoError(":set takes key=value pairs: max_tokens, beams, sample, temperature, top_p, seed")
    for assignment in rest:
        console.print(demo.update_setting(assignment))


def _compare(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    if rest not in (["on"], ["off"]):
        raise DemoError(":compare takes on or off")
    demo.compare = rest == ["on"]
    console.print(f"compare: {rest[0]}")


def _attention(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    if len(rest) != 1:
        raise DemoError(":attention takes the picture file to write, e.g. :attention map.png")
    target = picture_path(rest[0], ":attention")
    probe = ImageAttentionMeter()
    _ask(demo, last.prompt if last else "", console, probe=probe)
    save_attention(demo, probe, target)
    console.print(f"saved {target}")


def _show_command(demo: Demo, rest: list[str], console: Console, last: Turn | None) -> None:
    _show(demo, console)


# a command's name (and its aliases) -> its handler(demo, arguments, console, last turn)
COMMANDS = {
    "quit": _quit,
    "q": _quit,
    "exit": _quit,
    "help": _help,
    "h": _help,
    "?": _help,
    "image": _image,
    "scene": _scene,
    "method": _method,
    "methods": _method,
    "set": _set,
    "compare": _compare,
    "attention": _attention,
    "show": _show_command,
}


def _next_index(demo: Demo, split: str) -> int:
    label = demo.picture.label if demo.picture else ""
    parts = label.split()
    if len(parts) == 3 and parts[0] == split and parts[2].isdigit():
        return int(parts[2]) + 1
    return 0


def _show(demo: Demo, console: Console) -> None:
    if demo.picture is not None:
        console.print(render.preview(demo.picture.image), end="")
        console.print(f"picture: {demo.picture.label}")
    console.print(
        f"methods: {demo.describe_methods()} | {demo.settings.describe()} | compare {'on' if demo.compare else 'off'}"
    )


def _ask(demo: Demo, prompt: str, console: Console, probe=None) -> Turn | None:
    """Answer with the tokens streaming into a live table; Ctrl-C stops and keeps what came."""
    texts: dict[str, Text] = {}

    def table() -> Table:
        grid = Table(expand=True)
        for side in texts:
            grid.add_column("plain" if side == "plain" else f"guarded: {demo.describe_methods()}", ratio=1)
        if texts:
            grid.add_row(*texts.values())
        return grid

    with Live(table(), console=console, auto_refresh=False, transient=True) as live:

        def start(side: str) -> None:
            texts[side] = Text()
            live.update(table(), refresh=True)

        def piece(side: str, text: str) -> None:
            texts[side].append(text)
            live.update(table(), refresh=True)

        turn = demo.ask(prompt, on_start=start, on_piece=piece, probe=probe)
    console.print(render.comparison(turn, demo.chair))
    console.print(render.summary(turn), end="")
    return turn


def _readline() -> None:
    with contextlib.suppress(ImportError):  # platforms without readline keep plain input()
        import readline  # noqa: F401  (input() gains line editing and history)


# ---- attention map -------------------------------------------------------------------------------------


def save_attention(demo: Demo, meter, path: str) -> None:
    from .meter import save_heatmap

    if meter is None or not meter.steps:
        raise DemoError("no answer was measured; ask a question first")
    save_heatmap(meter, demo.picture.image, path, title=f"{demo.picture.label}: image attention per (layer, head)")


# ---- entry ---------------------------------------------------------------------------------------------------


def main(args) -> int:
    console = Console(highlight=False, soft_wrap=False)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    one_shot = args.prompt is not None or args.json
    try:
        demo = Demo(args.model, is_testbed=args.model == "testbed")
        configure(demo, args)  # cheap checks first: a bad picture or method fails before loading
        load_model(demo, args)
        if one_shot:
            return run_once(demo, args, console)
        return interactive(demo, console)
    except DemoError as error:
        err.print(f"halluguard demo: error: {error}")
        return 1
