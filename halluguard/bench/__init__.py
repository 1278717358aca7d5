"""``halluguard bench``: what each method costs against plain ``generate``, measured side by side.

For each method spec the same batch is generated greedily with 1 new token (the prompt phase: the
prefill and whatever a method adds to it) and with ``1 + N`` (``min_new_tokens`` forces the length);
the per-token decode time is the difference over ``N``. Plain and guarded runs alternate (plain,
guarded, plain, guarded, ...) after a warm-up, so drifts of a shared machine hit both. Per method:

* prompt phase and per-token times, median over the repeats, and the ratio of the medians to those
  of the plain runs interleaved with that method, with the range (min-max) of the per-repeat ratios
  as the spread (the plain row gives the median of every plain run);
* decoded tokens per second (batch x N over the decode time);
* peak memory of the full run: CUDA's max allocated, or on CPU the process's resident high-water mark
  reset before the run (Linux ``/proc/self/clear_refs``), beside plain's;
* forwards per decoded token (model forward calls of the full run minus the prompt run, over N):
  1 for plain, 1 for methods whose branches ride as extra rows, more for separate streams.

A repeat whose full run is not slower than its prompt run (a shared machine stalled the prompt
run) gives no per-token time: it is measured again, up to ``RETRIES`` times, and then the run stops
with ``BenchError`` instead of printing an impossible time or ratio.

A method's own decoding settings apply (OPERA searches with its 5 beams; plain is greedy). A method
that searches with beams also gets a row of plain beam search with as many beams (``plain, 5 beams``),
timed the same way: the search its own cost is to be read against. Timings are for reading, not for
tests.

``ops=True`` also counts, per row and in the same run, the operations of plain and guarded
``generate`` (``halluguard.bench.ops``: aten operations in the prompt phase and per decoded token,
the extra per layer per step over plain, Triton launches per token): counted once, as counts do not
vary between runs.

``official=True`` adds, for the benched attention-reading methods, rows that re-enact how their
official implementations decode (:data:`OFFICIAL`): eager attention with ``output_attentions`` at every step (whole
attention maps materialised and returned), and a contrast branch as a second, sequential forward with
its own cache. They time that floor (the maps and the forwards), not each method's arithmetic on the
maps, so the official cost is at least what they show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import statistics
import time
from pathlib import Path

import torch

from .. import compat
from . import synthetic
from .ops import StepCounts, step_counts

# official-way rows: name -> (sequential forwards per step, beams, the methods whose official code decodes so)
OFFICIAL = {
    "official way: maps (VAR, Lookback)": (1, 1, ("var", "lookback")),
    "official way: maps + 2nd forward (AvisC)": (2, 1, ("avc",)),
    "official way: maps, 5 beams (OPERA)": (1, 5, ("opera",)),
}
RETRIES = 3  # tries at a repeat whose per-token time comes out impossible before the run gives up


class BenchError(Exception):
    """A run that cannot give a measurement (one line, exit status 1)."""


@dataclasses.dataclass
class Row:
    method: str
    prompt_s: float
    prompt_ratio: float
    token_ms: float
    token_ratio: float
    token_ratio_range: tuple[float, float]
    tokens_per_s: float
    peak_mb: float | None
    forwards_per_token: float
    # with ops: aten operations in the prompt phase and per decoded token, the extra per layer per
    # decode step over plain, and Triton launches per decoded token
    prompt_ops: int | None = None
    ops_per_token: float | None = None
    extra_ops_per_layer_step: float | None = None
    launches_per_token: float | None = None


def load(spec: str, batch: int, device: str | None = None, dtype: str = "auto"):
    """``(model, processor or None, inputs, name)`` for testbed, a synthetic model (``synthetic.SHAPES``,
    made on ``device``, by default where ``load_model`` puts a checkpoint: this process's GPU when
    there is one) or a checkpoint. Raises ``ValueError`` for an unknown synthetic model, dtype or
    device."""
    if spec.startswith("synthetic-"):
        from halluguard.models import DTYPES, check_device, default_device, dtype_of

        synthetic.shape(spec)  # an unknown name is refused with the known ones
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if device:
            check_device(device)
        model = synthetic.build(spec, device=device or default_device() or "cpu", dtype=dtype_of(dtype))
        floats = {"pixel_values": model.dtype}
        inputs = {k: v.to(model.device, floats.get(k)) for k, v in synthetic.inputs(batch, name=spec).items()}
        return model, None, inputs, f"{spec} ({synthetic.SHAPES[spec].label}, {str(model.dtype).split('.')[-1]})"
    from halluguard.eval.chair import CHAIR_PROMPT
    from halluguard.models import build_prompt, encode, load_model

    model, processor, name = load_model(spec, dtype=dtype, device=device)
    if spec == "testbed":
        from halluguard.testbed import world

        images = [s.render() for s in world.scenes("misleading", batch)]
    else:
        from PIL import Image

        images = [Image.new("RGB", (336, 336), (120 + 20 * i, 110, 100)) for i in range(batch)]
    prompts = [build_prompt(processor, CHAIR_PROMPT)] * batch
    inputs = encode(processor, prompts, images)
    return model, processor, dict(inputs.to(model.device)), name


class _Counter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: the peak becomes the current size
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def _plain(model, inputs, new_tokens: int) -> None:
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def _official(forwards: int, beams: int):
    """Greedy (or beam) decoding as the official attention-reading implementations run it: every
    forward returns its attention maps; ``forwards`` > 1 runs each step's branches one after another,
    each with its own cache (the contrast of their logits costs next to nothing and is left out)."""

    def run(model, inputs, new_tokens: int) -> None:
        if forwards == 1:
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=beams,
                output_attentions=True,
                return_dict_in_generate=True,
            )
            return
        from transformers import DynamicCache

        caches = [DynamicCache(config=model.config.get_text_config(decoder=True)) for _ in range(forwards)]
        mask = inputs["attention_mask"]
        outs = [model(**inputs, **{compat.CACHE: c}, use_cache=True, output_attentions=True) for c in caches]
        for _ in range(new_tokens - 1):
            token = outs[0].logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            outs = [
                model(input_ids=token, attention_mask=mask, **{compat.CACHE: c}, use_cache=True, output_attentions=True)
                for c in caches
            ]

    return run


@contextlib.contextmanager
def _eager_text(model):
    """The text backbone on eager attention (which returns maps), restored afterwards."""
    before = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": before})


def _run(
    model, inputs, new_tokens: int, counter: _Counter, memory: bool = False, generate=_plain
) -> tuple[float, int, float | None]:
    device = model.device
    if memory:
        _peak_reset(device)
    calls = counter.calls
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        generate(model, inputs, new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, counter.calls - calls, _peak_mb(device) if memory else None


def measure(
    model, processor, inputs, specs: list[str], new_tokens: int, repeats: int, overrides: dict, echo=print,
    official: bool = False, checkpoint=None, ops: bool = False, shared: dict | None = None,
):  # fmt: skip
    """One ``Row`` for plain generation, one per spec, and with ``official`` one per :data:`OFFICIAL`
    re-enactment, timed as the module docstring says (with ``ops``, the specs' and plain's operations
    counted too); ``checkpoint`` is called before every measured pair of runs (it raises to stop,
    e.g. ``Interrupts.check``). ``shared``, a dict the caller passes to several calls on the same model
    and inputs, keeps what does not depend on the specs (plain's operation counts, plain beam search)
    from the first call that measures it for the next ones."""
    session = _Session(model, inputs, new_tokens, repeats, echo, checkpoint, count_ops=ops)
    shared = {} if shared is None else shared
    skipped = []
    try:
        session.run(2)  # warm-up
        if ops:
            _counted_once(session, shared, "plain")
        for spec in specs:
            reason = _measure_spec(session, processor, spec, overrides)
            if reason is not None:
                skipped.append(reason)
        for beams in sorted(b for b in session.beams if b > 1):
            _measure_beam_search(session, beams, shared)
        if official:
            _measure_official(session, specs)
    finally:
        session.counter.handle.remove()
    if not session.results:
        raise BenchError(f"no method could run on this model ({'; '.join(skipped)})")
    rows = _rows(session.results, new_tokens, inputs["input_ids"].shape[0])
    if ops:
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        rows = [_with_ops(row, session.ops.get(row.method), session.ops["plain"], layers) for row in rows]
    return rows


def _with_ops(row: Row, counts: StepCounts | None, plain: StepCounts, layers: int) -> Row:
    """``row`` with its operation counts (an official-way row has none)."""
    if counts is None:
        return row
    return dataclasses.replace(
        row,
        prompt_ops=counts.prompt.aten,
        ops_per_token=counts.aten_per_token,
        extra_ops_per_layer_step=counts.extra_per_layer_step(plain, layers),
        launches_per_token=counts.launches_per_token,
    )


class _Session:
    """The model and batch one ``measure`` call times, and what it measured per row: ``results[name]``
    is ``(times, forwards, peaks)``, each keyed or split by side (plain or guarded)."""

    def __init__(self, model, inputs, new_tokens: int, repeats: int, echo, checkpoint, count_ops: bool = False):
        self.model, self.inputs, self.new_tokens, self.repeats = model, inputs, new_tokens, repeats
        self.echo, self.checkpoint = echo, checkpoint
        self.counter = _Counter(model)
        self.results: dict[str, tuple[dict, list, dict]] = {}
        self.count_ops = count_ops
        self.ops: dict[str, StepCounts] = {}  # with count_ops: per row name
        self.beams: set[int] = set()  # the beam counts the measured specs searched with

    def counted(self, name: str, generate=_plain) -> None:
        """Count the operations of ``generate`` as the model is now (plain, or inside a guard)."""
        if self.checkpoint is not None:
            self.checkpoint()
        self.ops[name] = step_counts(lambda n: generate(self.model, self.inputs, n), self.new_tokens)
        self.echo(f"  {name}: operations counted")

    def run(self, new_tokens: int, memory: bool = False, generate=_plain) -> tuple[float, int, float | None]:
        return _run(self.model, self.inputs, new_tokens, self.counter, memory=memory, generate=generate)

    def pair(self, name: str, how, memory: bool) -> tuple[float, float, float, float | None]:
        """A prompt run and a full run: ``(prompt s, full s, forwards per token, peak)``, measured again
        while the full run is not slower than the prompt run."""
        new_tokens = self.new_tokens
        for _ in range(RETRIES):
            if self.checkpoint is not None:
                self.checkpoint()
            prompt, prompt_calls, _ = self.run(1, generate=how)
            full, full_calls, peak = self.run(1 + new_tokens, memory=memory, generate=how)
            if full > prompt:
                return prompt, full, (full_calls - prompt_calls) / new_tokens, peak
        raise BenchError(
            f"{name}: the decode time could not be measured: in {RETRIES} tries the run of {1 + new_tokens} "
            f"tokens was not slower than the run of 1 ({full:.3f} s against {prompt:.3f} s); the machine is too "
            "busy, or --new-tokens too few"
        )

    def interleaved(self, name: str, guarded, generate=_plain) -> None:
        """``repeats`` x (plain run, run inside ``guarded()``), each a prompt run and a full run."""
        times = {"plain": [], "guarded": []}
        forwards, peaks = [], {}
        for r in range(self.repeats):
            for side in ("plain", "guarded"):
                with guarded() if side == "guarded" else contextlib.nullcontext():
                    how = generate if side == "guarded" else _plain
                    prompt, full, per_token, peak = self.pair(name if side == "guarded" else "plain", how, r == 0)
                times[side].append((prompt, full))
                if r == 0:
                    peaks[side] = peak
                    forwards.append(per_token)
        self.results[name] = (times, forwards, peaks)
        self.echo(f"  {name}: done")


def _measure_spec(session: _Session, processor, spec: str, overrides: dict) -> str | None:
    """Time one method spec against plain runs; the reason it was skipped (a method that needs data
    this model lacks: VAR's sinks, DeCoRe's heads), else ``None``."""
    import halluguard as hg
    from halluguard.registry import configs_from_spec, method_beams

    chosen = {n: overrides[n] for n in spec.split("+") if n in overrides}
    configs = configs_from_spec(spec, chosen or None)
    try:
        with hg.wrap(session.model, processor, configs):
            session.run(2)  # the method's warm-up
    except ValueError as err:
        session.echo(f"  {spec}: skipped: {str(err).splitlines()[0]}")
        return f"{spec}: {str(err).splitlines()[0]}"
    session.interleaved(spec, lambda: hg.wrap(session.model, processor, configs))
    if session.count_ops:
        with hg.wrap(session.model, processor, configs):
            session.counted(spec)
    session.beams.add(method_beams(configs))
    return None


def _beam_search(beams: int):
    """Plain beam search with ``beams`` beams, as a ``generate`` of :func:`_run`."""

    def run(model, inputs, new_tokens: int) -> None:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=beams)

    return run


def _measure_beam_search(session: _Session, beams: int, shared: dict) -> None:
    """Time plain beam search with ``beams`` beams against plain greedy runs (operations counted too),
    or take the measurement from ``shared`` where an earlier call made it."""
    name, search = f"plain, {beams} beams", _beam_search(beams)
    if name not in shared:
        session.run(2, generate=search)  # warm-up
        session.interleaved(name, contextlib.nullcontext, search)
        shared[name] = session.results[name]
    session.results[name] = shared[name]
    if session.count_ops:
        _counted_once(session, shared, name, search)


def _counted_once(session: _Session, shared: dict, name: str, generate=_plain) -> None:
    """``session.ops[name]``: counted now, or the counts of an earlier call kept in ``shared``."""
    if f"ops {name}" not in shared:
        session.counted(name, generate)
        shared[f"ops {name}"] = session.ops[name]
    session.ops[name] = shared[f"ops {name}"]


def _measure_official(session: _Session, specs: list[str]) -> None:
    """Time the :data:`OFFICIAL` re-enactments of the attention-reading methods among ``specs``."""
    benched = {name for spec in specs for name in spec.split("+")}
    for name, (forwards, beams, methods) in OFFICIAL.items():
        if not benched & set(methods):
            continue
        with _eager_text(session.model):
            session.run(2, generate=_official(forwards, beams))  # warm-up
        session.interleaved(name, lambda: _eager_text(session.model), _official(forwards, beams))


def _rows(results: dict, new_tokens: int, batch: int) -> list[Row]:
    """The plain row (every plain run of every measured row) and one row per measured name."""
    plain_runs = [run for times, _, _ in results.values() for run in times["plain"]]
    plain_peaks = [p["plain"] for _, _, p in results.values() if p.get("plain") is not None]
    plain_forwards = [f[0] for _, f, _ in results.values()]
    rows = [
        _row(
            "plain",
            plain_runs,
            plain_runs,
            new_tokens,
            batch,
            statistics.median(plain_peaks) if plain_peaks else None,
            statistics.median(plain_forwards) if plain_forwards else 1.0,
        )
    ]
    for name, (times, forwards, peaks) in results.items():
        rows.append(_row(name, times["guarded"], times["plain"], new_tokens, batch, peaks.get("guarded"), forwards[1]))
    return rows


def _row(name, runs, plain_runs, new_tokens, batch, peak, forwards) -> Row:
    prompt = [p for p, _ in runs]
    token = [(f - p) / new_tokens for p, f in runs]
    plain_prompt = [p for p, _ in plain_runs]
    plain_token = [(f - p) / new_tokens for p, f in plain_runs]
    # the ratio of medians; the spread from the repeats whose plain decode time is measurable
    ratios = [t / pt for t, pt in zip(token, plain_token) if pt > 0] or [float("nan")]
    median_token = statistics.median(token)
    return Row(
        method=name,
        prompt_s=statistics.median(prompt),
        prompt_ratio=statistics.median(prompt) / statistics.median(plain_prompt),
        token_ms=median_token * 1e3,
        token_ratio=median_token / statistics.median(plain_token),
        token_ratio_range=(min(ratios), max(ratios)),
        tokens_per_s=batch / max(median_token, 1e-12),
        peak_mb=peak,
        forwards_per_token=forwards,
    )


def markdown(rows: list[Row]) -> str:
    lines = [
        "| method | prompt (s) | ratio | per token (ms) | ratio (min-max) | tokens/s | peak MB | forwards/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f"{r.token_ratio:.2f}x ({r.token_ratio_range[0]:.2f}-{r.token_ratio_range[1]:.2f})"
        peak = f"{r.peak_mb:.0f}" if r.peak_mb else "-"
        lines.append(
            f"| {r.method} | {r.prompt_s:.3f} | {r.prompt_ratio:.2f}x | {r.token_ms:.1f} | {spread} | "
            f"{r.tokens_per_s:.1f} | {peak} | {r.forwards_per_token:.2f} |"
        )
    return "\n".join(lines)


def ops_markdown(rows: list[Row]) -> str:
    """The operation counts of the rows that have them (``measure(..., ops=True)``)."""
    lines = [
        "| method | aten ops, prompt phase | aten ops / token | extra / layer / step | Triton launches / token |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.ops_per_token is not None:
            lines.append(
                f"| {r.method} | {r.prompt_ops} | {r.ops_per_token:.1f} | {r.extra_ops_per_layer_step:.1f} | "
                f"{r.launches_per_token:.1f} |"
            )
    return "\n".join(lines)


def chart(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r.method for r in rows[1:]]
    x = range(len(methods))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods) + 2), 3.6))
    ax.bar([i - 0.2 for i in x], [r.prompt_ratio for r in rows[1:]], width=0.4, label="prompt phase")
    low = [r.token_ratio - r.token_ratio_range[0] for r in rows[1:]]
    high = [r.token_ratio_range[1] - r.token_ratio for r in rows[1:]]
    ax.bar([i + 0.2 for i in x], [r.token_ratio for r in rows[1:]], width=0.4, yerr=[low, high], label="per token")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(x), methods, rotation=20)
    ax.set_ylabel("time / plain generate")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
