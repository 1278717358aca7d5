"""What the demo does, apart from the terminal: pictures, settings, plain and guarded answers.

A ``Demo`` holds a model and its processor, the current picture (a file, or a scene of the test
model's world, whose objects are known), the methods (a spec such as ``"pai+vhr"`` with ``key=value``
overrides) and the decoding settings. ``answer`` generates once, plain or guarded, streaming text
pieces to a callback; ``ask`` answers both ways when comparing. Object words come from a CHAIR
synonym table (the world's for the test model, COCO's otherwise); for world scenes, words naming an
object that is not drawn are hallucinations. With Lookback Lens in the methods, its flagged token runs
come back with the answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_PROMPT = "Describe the image."


class DemoError(Exception):
    """A user-facing problem: one line, and the session goes on."""


@dataclasses.dataclass
class Settings:
    """Decoding settings changed with ``:set key=value``."""

    ALIASES = {"max_tokens": "max_new_tokens", "tokens": "max_new_tokens", "beams": "num_beams", "sample": "do_sample"}

    max_new_tokens: int = 48
    num_beams: int | None = None  # None: the methods' own (OPERA searches with 5 beams), else 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def update(self, assignment: str) -> str:
        key, value = split_assignment(assignment)
        key = self.ALIASES.get(key, key)
        kinds = {"max_new_tokens": int, "num_beams": int, "do_sample": bool, "temperature": float, "top_p": float}
        kind = {**kinds, "seed": int}.get(key)
        if kind is None:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise DemoError(f"unknown setting {key!r}; settings: {names} (or max_tokens, beams, sample)")
        try:
            if kind is bool:
                if value.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                parsed: Any = value.lower() in ("on", "true", "1", "yes")
            else:
                parsed = kind(value)
        except ValueError:
            raise DemoError(f"{key} takes {'on/off' if kind is bool else kind.__name__}, not {value!r}") from None
        if key in ("max_new_tokens", "num_beams") and parsed < 1:
            raise DemoError(f"{key} must be at least 1")
        if key == "temperature" and parsed <= 0:
            raise DemoError("temperature must be positive")
        if key == "top_p" and not 0 < parsed <= 1:
            raise DemoError("top_p must be in (0, 1]")
        setattr(self, key, parsed)
        return f"{key} = {parsed}"

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.num_beams is not None:
            kwargs["num_beams"] = self.num_beams
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def describe(self) -> str:
        how = f"sampling (t={self.temperature}, p={self.top_p})" if self.do_sample else "greedy"
        beams = f", {self.num_beams} beams" if (self.num_beams or 1) > 1 else ""
        return f"{how}{beams}, up to {self.max_new_tokens} tokens"


def split_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise DemoError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def parse_value(text: str) -> Any:
    """``0.5`` -> 0.5, ``true`` -> True, ``[1,2]`` -> [1, 2]; anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclasses.dataclass
class Picture:
    image: Any  # PIL image, RGB
    label: str  # a path, or "misleading scene 0"
    objects: frozenset[str] | None = None  # node words drawn (world scenes)


@dataclasses.dataclass
class Answer:
    text: str
    pieces: list[str]  # the decoded text of each generated token, in order
    objects: list[str]  # node words named, in order of mention
    flagged: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # Lookback's token runs
    stopped: bool = False  # interrupted before the end


@dataclasses.dataclass
class Turn:
    prompt: str
    plain: Answer | None
    guarded: Answer | None
    methods: str
    picture: str
    truth: frozenset[str] | None

    def only(self, which: str) -> set[str]:
        """Object words one side names and the other does not."""
        if self.plain is None or self.guarded is None:
            return set()
        mine, theirs = (self.plain, self.guarded) if which == "plain" else (self.guarded, self.plain)
        return set(mine.objects) - set(theirs.objects)

    def hallucinated(self, answer: Answer | None) -> set[str]:
        if answer is None or self.truth is None:
            return set()
        return {w for w in answer.objects if w not in self.truth}

    def to_dict(self) -> dict:
        def side(answer):
            if answer is None:
                return None
            return {
                "text": answer.text,
                "objects": answer.objects,
                "hallucinated": sorted(self.hallucinated(answer)),
                "flagged_tokens": [list(span) for span in answer.flagged],
                "stopped": answer.stopped,
            }

        return {
            "picture": self.picture,
            "prompt": self.prompt,
            "methods": self.methods,
            "ground_truth": sorted(self.truth) if self.truth is not None else None,
            "plain": side(self.plain),
            "guarded": side(self.guarded),
            "only_plain": sorted(self.only("plain")),
            "only_guarded": sorted(self.only("guarded")),
        }


class _PieceStreamer:
    """A transformers streamer that hands each new token's text to ``on_piece`` (batch of one)."""

    def __init__(self, tokenizer, on_piece: Callable[[str], None]):
        self.tokenizer, self.on_piece = tokenizer, on_piece
        self.ids: list[int] = []
        self.text = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.on_piece(text[len(self.text) :])
        self.text = text

    def end(self) -> None:
        pass


class Demo:
    """The model, the picture, the methods and the settings of one session."""

    def __init__(self, name: str, is_testbed: bool, model=None, processor=None):
        from halluguard.eval.chair import Chair

        self.model, self.processor, self.name, self.is_testbed = model, processor, name, is_testbed
        if is_testbed:
            from halluguard.testbed import world

            self.chair = Chair(synonyms=world.synonyms_text(), gt={})
        else:
            self.chair = Chair(gt={})
        self.settings = Settings()
        self.methods_spec = ""
        self.overrides: dict[str, dict] = {}
        self.configs: list = []
        self.compare = True
        self.picture: Picture | None = None

    # ---- pictures -----------------------------------------------------------------------------------
    def load_image(self, path: str) -> Picture:
        from PIL import Image, UnidentifiedImageError

        file = Path(path).expanduser()
        try:
            with Image.open(file) as opened:
                image = opened.convert("RGB")
        except FileNotFoundError:
            raise DemoError(f"no image file at {file}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DemoError(f"cannot read {file} as an image ({err.__class__.__name__})") from None
        self.picture = Picture(image, str(file))
        return self.picture

    def load_scene(self, split: str = "misleading", index: int = 0) -> Picture:
        from halluguard.testbed import world

        if split not in world.SPLIT_SEEDS or split == "train":
            splits = ", ".join(s for s in world.SPLIT_SEEDS if s != "train")
            raise DemoError(f"unknown scene split {split!r}; splits: {splits}")
        if index < 0:
            raise DemoError("a scene index is 0 or more")
        scene = world.sample_scene(split, index)
        self.picture = Picture(scene.render(), f"{split} scene {index}", frozenset(scene.categories))
        return self.picture

    # ---- methods ------------------------------------------------------------------------------------
    def set_methods(self, spec: str, assignments: list[str] = ()) -> str:
        """``spec`` ("vhr", "pai+vhr", "none") with ``key=value`` or ``method.key=value`` overrides."""
        from halluguard.registry import get_config

        names = [n.strip() for n in spec.split("+") if n.strip() and n.strip() != "none"]
        overrides: dict[str, dict] = {n: {} for n in names}
        for assignment in assignments:
            key, value = split_assignment(assignment)
            method, _, field = key.rpartition(".")
            if not method:
                if len(names) != 1:
                    raise DemoError(f"with several methods, name the method of {key!r}: method.{key}=...")
                method = names[0]
            if method not in overrides:
                raise DemoError(f"{method!r} is not among the methods {spec!r}")
            overrides[method][field] = parse_value(value)
        try:
            configs = [get_config(n, **overrides[n]) for n in names]
        except (TypeError, ValueError) as err:
            raise DemoError(str(err).splitlines()[0]) from None
        self._check(self._with_classifier(configs), self.settings)
        self.methods_spec, self.overrides, self.configs = "+".join(names), overrides, self._with_classifier(configs)
        return self.describe_methods()

    def update_setting(self, assignment: str) -> str:
        """``:set key=value``, refused when the methods could not decode that way."""
        settings = dataclasses.replace(self.settings)
        said = settings.update(assignment)
        self._check(self.configs, settings)
        self.settings = settings
        return said

    def _check(self, configs: list, settings: Settings) -> None:
        """Refuse now what the next answer could not run: methods that do not compose, or a decoding
        one of them cannot do (OPERA and one beam, guided decoding and greedy search, ...)."""
        from halluguard.api import check_decoding
        from halluguard.registry import method_beams

        try:
            check_decoding(configs, settings.num_beams or method_beams(configs), settings.do_sample)
        except ValueError as err:
            raise DemoError(str(err).splitlines()[0]) from None

    def _with_classifier(self, configs: list) -> list:
        """Lookback Lens on the test model reads its shipped classifier unless one is given, so its
        flagged tokens show."""
        if not self.is_testbed:
            return configs
        from halluguard.testbed import path

        shipped = path() / "lookback.json"
        return [
            dataclasses.replace(c, classifier=str(shipped))
            if c.name == "lookback" and getattr(c, "classifier", None) is None and shipped.exists()
            else c
            for c in configs
        ]

    def use_configs(self, spec: str, configs: list) -> str:
        """Methods given as configs (the command line's ``--config``)."""
        self._check(list(configs), self.settings)
        self.methods_spec = "+".join(c.name for c in configs)
        self.overrides, self.configs = {}, self._with_classifier(list(configs))
        return self.describe_methods()

    def _methods(self) -> list:
        """The methods of the current configs (not installed on the model)."""
        from halluguard.registry import entry

        return [entry(c.name).method_cls(c) for c in self.configs]

    def describe_methods(self) -> str:
        if not self.configs:
            return "none (plain decoding only)"
        parts = []
        for name in self.methods_spec.split("+"):
            changed = ", ".join(f"{k}={v}" for k, v in self.overrides.get(name, {}).items())
            parts.append(f"{name}({changed})" if changed else name)
        return "+".join(parts)

    # ---- answers ------------------------------------------------------------------------------------
    def _inputs(self, prompt: str) -> dict:
        from halluguard.models import build_prompt, encode

        if self.picture is None:
            raise DemoError("no picture: load one with :image PATH or :scene")
        text = build_prompt(self.processor, prompt)
        inputs = encode(self.processor, [text], [self.picture.image])
        device = next(self.model.parameters()).device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def answer(self, prompt: str, guarded: bool, on_piece: Callable[[str], None] | None = None, probe=None) -> Answer:
        """One answer; ``on_piece`` receives each token's text as it is generated (greedy or sampling
        without a method that owns the loop; otherwise the whole text at the end). ``probe``: an extra
        method instance run alongside (a meter)."""
        import halluguard as hg

        inputs = self._inputs(prompt)
        methods = list(self.configs) if guarded else []
        if probe is not None:
            methods.append(probe)
        tokenizer = self.processor.tokenizer
        kwargs = self.settings.generate_kwargs()
        streamer = None
        # a decoding loop that settles tokens late (OPERA's beam search, Lookback's guided decoding)
        # refuses a streamer: its answer comes whole
        late = guarded and any(m.capabilities.late_tokens for m in self._methods())
        if on_piece is not None and (self.settings.num_beams or 1) == 1 and not late:
            streamer = _PieceStreamer(tokenizer, on_piece)
        torch.manual_seed(self.settings.seed)
        stopped = False
        guard = None
        try:
            with torch.no_grad():
                if methods:
                    guard = hg.wrap(self.model, self.processor, methods)
                out = self.model.generate(**inputs, **kwargs, streamer=streamer)
        except KeyboardInterrupt:
            stopped = True
            out = None
        except ValueError as err:
            raise DemoError(str(err).splitlines()[0]) from None
        finally:
            if guard is not None:
                guard.unwrap()
        if out is None:
            ids = streamer.ids if streamer is not None else []
        else:
            ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        pieces = _pieces(tokenizer, ids)
        text = "".join(pieces).strip()
        if streamer is None and on_piece is not None and text:
            on_piece(text)
        flagged = []
        if guard is not None and guard.results.get("lookback"):
            flagged = list(guard.results["lookback"][0].spans)
        objects = self.chair.caption_to_words(text)[1] if text else []
        return Answer(text, pieces, objects, flagged, stopped)

    def ask(self, prompt: str | None, on_start=None, on_piece=None, probe=None) -> Turn:
        """Plain and guarded answers (comparing), or the guarded one alone; ``on_start(side)`` is
        called before each side generates, ``on_piece(side, text)`` with each token's text."""
        prompt = (prompt or "").strip() or DEFAULT_PROMPT
        sides = (["plain"] if self.compare or not self.configs else []) + (["guarded"] if self.configs else [])
        answers: dict[str, Answer | None] = {"plain": None, "guarded": None}
        for side in sides:
            if on_start is not None:
                on_start(side)
            callback = (lambda text, side=side: on_piece(side, text)) if on_piece is not None else None
            answers[side] = self.answer(prompt, side == "guarded", callback, probe if side == sides[-1] else None)
            if answers[side].stopped:
                break
        picture = self.picture
        return Turn(
            prompt, answers["plain"], answers["guarded"], self.describe_methods(), picture.label, picture.objects
        )


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded answer."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        pieces.append(text[len(previous) :])
        previous = text
    return pieces
