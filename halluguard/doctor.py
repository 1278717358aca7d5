"""``halluguard doctor``: does halluguard work with the transformers (and torch) installed here?

The test suite proves the guard's identities on the transformers releases CI runs (pyproject's
floor and the newest release; ``compat.NEWEST_TESTED``). On any other release this checks the same
things on the shipped test model:

* each method's neutral config gives plain ``generate``'s tokens: greedy, and beam search where
  the method follows it (a beam-search method: its search against ``generate``'s);
* each method acting changes the next-token scores (a method that changes nothing is broken); a
  method whose defaults only read (Lookback Lens' detection) returns a reading of every token;
* ``unwrap`` restores the logits bit for bit after a guarded ``generate`` with the method acting;
* a contrast branch riding along as extra rows gives what it gives run as its own forwards
  (every method with a ``separate_stream`` setting);
* the effects the README reports on the test model: on its 300 misleading scenes (greedy, 64
  tokens, batch 16, the CHAIR prompt) VCD, AvisC and PAI name the absent partner less often than
  plain decoding, each within ``EFFECT_MARGIN`` points of the README's figure;
* transformers warns of no deprecation in halluguard's calls (a warning, not a failure: the
  release after may remove what is deprecated).

The identity checks decode a left-padded batch of two prompts. One line per check; ``main``
returns 1 when one fails, with what to do. On this project's 2-core CPU it takes about 30 s
(``--skip-effects``: 5 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import compat, registry
from .api import wrap

NEW_TOKENS = 12  # tokens per identity check
BEAMS = 3  # beam search's width in the identity checks (a beam-search method uses its own)
SCORE_TOLERANCE = 1e-4  # next-token scores that differ by less than this are the same
# What each method needs on the test model besides its defaults ("{testbed}": the model's folder).
TESTBED_CONTEXT: dict[str, dict[str, Any]] = {
    # the test model has no massive activations: two dimensions and a low threshold give it sinks
    "var": {"sink_dims": (0, 1), "tau": 1.5, "first_layer": 1},
    "decore": {"retrieval_heads": "{testbed}/retrieval_heads.json", "num_retrieval_heads": 4},
    "lookback": {"classifier": "{testbed}/lookback.json"},
    "vti": {"directions": "{testbed}/vti.safetensors"},
}
# The README's figures on the test model (its first table): how often a caption of the 300
# misleading scenes names the anchor's absent partner, in percent.
README_PARTNER_NAMED = {"plain": 41.3, "vcd": 18.7, "avc": 29.0, "pai": 36.3}
EFFECT_MARGIN = 3.0  # points (9 captions of 300): what another CPU's or GPU's arithmetic may move
EFFECT_SCENES, EFFECT_TOKENS, EFFECT_BATCH = 300, 64, 16


Planned = tuple[str, Callable[[], tuple[bool, str]]]  # a check's title, and the check: (passed, detail)


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""
    warning: bool = False  # passed, with something to look at

    def line(self) -> str:
        status = "FAIL" if not self.passed else "warn" if self.warning else "ok  "
        return f"{status}  {self.name}" + (f": {self.detail}" if self.detail else "")


def versions() -> list[tuple[str, str]]:
    """``(package, version)`` of what decides whether halluguard works here."""
    from ._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (the kernel is off; the PyTorch path runs)"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        device = "CPU (no CUDA device)"
    return [
        ("halluguard", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", f"{compat.VERSION} (tested: {compat.tested_range()})"),
        ("triton", triton_version),
        ("device", device),
    ]


class Doctor:
    """The checks, on the shipped test model (loaded once)."""

    def __init__(self):
        from .eval.chair import CHAIR_PROMPT
        from .testbed import load, path, world

        self.model, self.processor = load()
        self.folder = str(path())
        scenes = list(world.scenes("misleading", 2, seed=0))
        prompts = [self.prompt("Describe the image."), self.prompt(CHAIR_PROMPT)]
        self.inputs = self.encode([s.render() for s in scenes], prompts)  # two lengths: left padding

    def prompt(self, text: str) -> str:
        from .models import build_prompt

        return build_prompt(self.processor, text)

    def encode(self, images: list, prompts: list[str]) -> dict:
        return dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))

    def config(self, name: str, **overrides: Any) -> Any:
        """Method ``name``'s config on the test model (its context there, then ``overrides``)."""
        context = TESTBED_CONTEXT.get(name, {})
        context = {k: v.format(testbed=self.folder) if isinstance(v, str) else v for k, v in context.items()}
        return registry.get_config(name, **{**context, **overrides})

    @torch.no_grad()
    def generate(self, method: Any = None, **decoding: Any) -> Any:
        """A guarded (or, without ``method``, plain) greedy generate on the two prompts, with its scores."""
        settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True)
        with wrap(self.model, self.processor, method) if method is not None else contextlib.nullcontext():
            return self.model.generate(**self.inputs, **{**settings, **decoding})

    # ---- the identities, per method ------------------------------------------------------------------
    def method_checks(self, name: str) -> list[Planned]:
        entry = registry.entry(name)
        acting, neutral = self.config(name), self.config(name, **entry.config_cls.neutral_overrides)
        beams = registry.method_beams([acting])
        decoding = {"num_beams": beams} if beams > 1 else {}
        if beams > 1:
            widths = {"beam search": beams}
        else:
            widths = {"greedy": 1, **({"beam search": BEAMS} if entry.capabilities_for().beams != "one" else {})}
        planned = [(f"{name}: its neutral config gives plain generate's tokens ({', '.join(widths)})",
                    lambda: self._neutral(neutral, widths))]  # fmt: skip
        if acting == neutral:  # its defaults only read
            planned.append((f"{name}: its reading covers every generated token", lambda: self._reads(name, acting)))
        else:
            planned.append((f"{name}: acting changes the next-token scores", lambda: self._acts(acting, decoding)))
        planned.append((f"{name}: unwrap restores the logits bit for bit", lambda: self._unwrap(acting, decoding)))
        if "separate_stream" in {f.name for f in dataclasses.fields(acting)}:
            planned.append((f"{name}: its branch riding along as extra rows gives what its own forwards give "
                            f"({', '.join(widths)})", lambda: self._branch(acting, widths)))  # fmt: skip
        return planned

    def _neutral(self, neutral: Any, widths: dict[str, int]) -> tuple[bool, str]:
        differ = [
            mode
            for mode, width in widths.items()
            if not torch.equal(
                self.generate(neutral, num_beams=width).sequences, self.generate(num_beams=width).sequences
            )
        ]
        return not differ, f"not with {', '.join(differ)}" if differ else ""

    def _acts(self, acting: Any, decoding: dict) -> tuple[bool, str]:
        same = _same_output(self.generate(**decoding), self.generate(acting, **decoding))
        return not same, "it changed nothing" if same else ""

    def _reads(self, name: str, config: Any) -> tuple[bool, str]:
        """A method that only reads: what it returns holds, for every sequence, finite numbers for
        every generated token (tensors whose first dimension is the token)."""
        with torch.no_grad(), wrap(self.model, self.processor, config) as guard:
            sequences = guard.generate(**self.inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens = sequences.shape[1] - self.inputs["input_ids"].shape[1]
        results = guard.results.get(name) or []
        covered = len(results) == sequences.shape[0] and all(_covers(r, tokens) for r in results)
        return covered, "" if covered else f"{len(results)} readings of {sequences.shape[0]} sequences"

    def _unwrap(self, acting: Any, decoding: dict) -> tuple[bool, str]:
        with torch.no_grad():
            before = self.model(**self.inputs).logits
            self.generate(acting, **decoding)
            after = self.model(**self.inputs).logits
        same = torch.equal(before, after)
        return same, "" if same else "they differ"

    def _branch(self, acting: Any, widths: dict[str, int]) -> tuple[bool, str]:
        apart = acting.replace(separate_stream=True)
        differ = [
            mode
            for mode, width in widths.items()
            if not _same_output(self.generate(acting, num_beams=width), self.generate(apart, num_beams=width))
        ]
        return not differ, f"the tokens or next-token scores differ with {', '.join(differ)}" if differ else ""

    # ---- the effects the README reports ---------------------------------------------------------------
    def partner_named(self, method: Any = None) -> float:
        """Percent of the misleading scenes' captions (greedy) that name the anchor's absent partner."""
        from .eval.chair import CHAIR_PROMPT
        from .testbed import world
        from .testbed.evaluate import partner_named

        scenes = list(world.scenes("misleading", EFFECT_SCENES, seed=0))
        prompt = self.prompt(CHAIR_PROMPT)
        captions = []
        with wrap(self.model, self.processor, method) if method is not None else contextlib.nullcontext():
            for start in range(0, len(scenes), EFFECT_BATCH):
                batch = scenes[start : start + EFFECT_BATCH]
                inputs = self.encode([s.render() for s in batch], [prompt] * len(batch))
                with torch.no_grad():
                    ids = self.model.generate(**inputs, max_new_tokens=EFFECT_TOKENS, do_sample=False)
                new = ids[:, inputs["input_ids"].shape[1] :]
                captions += self.processor.batch_decode(new, skip_special_tokens=True)
        return partner_named(scenes, captions)

    def effect_checks(self) -> list[Planned]:
        margin = f"margin {EFFECT_MARGIN:g} points"
        plain: list[float] = []  # plain decoding's figure, once measured

        def measure_plain() -> tuple[bool, str]:
            plain.append(self.partner_named())
            expected = README_PARTNER_NAMED["plain"]
            return abs(plain[0] - expected) <= EFFECT_MARGIN, f"{plain[0]:.1f}% (README {expected}%, {margin})"

        def measure(name: str, expected: float) -> tuple[bool, str]:
            if not plain:
                raise RuntimeError("plain decoding's figure is missing")
            got = self.partner_named(self.config(name))
            passed = got < plain[0] and abs(got - expected) <= EFFECT_MARGIN
            return passed, f"{got:.1f}% against plain's {plain[0]:.1f}% (README {expected}%, {margin})"

        scenes = f"{EFFECT_SCENES} misleading scenes"
        planned = [(f"plain decoding names the absent partner in the captions of {scenes}", measure_plain)]
        for name, expected in README_PARTNER_NAMED.items():
            if name != "plain":
                what = f"{name} names it less often than plain decoding"
                planned.append((what, functools.partial(measure, name, expected)))
        return planned


def _covers(reading: Any, tokens: int) -> bool:
    values = [getattr(reading, f.name) for f in dataclasses.fields(reading)]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(t.shape[0] == tokens and bool(t.isfinite().all()) for t in tensors)


def _same_output(a: Any, b: Any) -> bool:
    """Whether two generate outputs hold the same tokens and next-token scores (within the tolerance;
    scores cut to -inf must be cut in both)."""
    if not torch.equal(a.sequences, b.sequences) or len(a.scores) != len(b.scores):
        return False
    for x, y in zip(a.scores, b.scores):
        if not torch.equal(x.isneginf(), y.isneginf()):
            return False
        finite = x.isfinite() & y.isfinite()
        if not torch.allclose(x[finite], y[finite], atol=SCORE_TOLERANCE, rtol=0):
            return False
    return True


def run_check(title: str, check: Callable[[], tuple[bool, str]]) -> Check:
    """One check; an exception is a failure, reported in its first line."""
    try:
        passed, detail = check()
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        return Check(title, False, f"raised {type(err).__name__}: {first}")
    return Check(title, passed, detail)


def run_checks(report: Callable[[str], None] = print, effects: bool = True) -> list[Check]:
    """Every check on every method that runs, each reported as it ends, then whether transformers
    warned that something halluguard calls is deprecated (what the next release may remove)."""
    doctor = Doctor()
    planned = [item for name in registry.list_methods(available_only=True) for item in doctor.method_checks(name)]
    if effects:
        planned += doctor.effect_checks()
    checks = []
    with deprecations() as heard:
        for title, check in planned:
            checks.append(run_check(title, check))
            report(checks[-1].line())
    first = f"{len(heard)} warnings, the first: {heard[0]} (a coming release may break this)" if heard else ""
    checks.append(Check("transformers deprecates nothing halluguard calls", True, first, warning=bool(heard)))
    report(checks[-1].line())
    return checks


@contextlib.contextmanager
def deprecations() -> Iterator[list[str]]:
    """Collects the deprecation messages transformers gives meanwhile: ``FutureWarning`` and
    ``DeprecationWarning`` warnings raised in transformers or pointing at a call in halluguard, and
    transformers' log lines that say "deprecated"."""
    heard: list[str] = []

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "deprecat" in record.getMessage().lower():
                heard.append(record.getMessage())

    listener, logger = Listener(), logging.getLogger("transformers")
    logger.addHandler(listener)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield heard
    finally:
        logger.removeHandler(listener)
    heard += [
        str(w.message)
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning)) and _raised_by_us_or_transformers(w.filename)
    ]


def _raised_by_us_or_transformers(filename: str | None) -> bool:
    """A warning raised in transformers, or (with its stack level) at a call in halluguard."""
    import transformers

    packages = [Path(transformers.__file__).parent, Path(__file__).parent]
    return filename is not None and any(Path(filename).resolve().is_relative_to(p.resolve()) for p in packages)


def main(effects: bool = True) -> int:
    """Print the versions and run every check; 0 when all pass, 1 otherwise."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    print("halluguard doctor: the guard's identities and the methods' effects on the shipped test model")
    for package, version in versions():
        print(f"  {package:13s} {version}")
    started = time.perf_counter()
    checks = run_checks(effects=effects)
    failed = [c for c in checks if not c.passed]
    seconds = time.perf_counter() - started
    if not failed:
        warned = sum(c.warning for c in checks)
        print(f"all {len(checks)} checks passed in {seconds:.0f} s" + (f" ({warned} with a warning)" if warned else ""))
        return 0
    print(
        f"{len(failed)} of {len(checks)} checks failed in {seconds:.0f} s: halluguard's results cannot be trusted "
        f"with transformers {compat.VERSION} and torch {torch.__version__}. Install a tested transformers "
        f"(pip install 'transformers=={compat.NEWEST_TESTED}'; tested: {compat.tested_range()}), run "
        "`halluguard doctor` again, and report this output with the failing lines."
    )
    return 1
