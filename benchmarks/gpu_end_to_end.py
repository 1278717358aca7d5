"""On one CUDA GPU, end to end, inside a time budget: the kernel's tests, the guard's identities, what
each method costs a whole guarded ``generate`` of a 7B-shaped model against plain, and the kernel
against SDPA at batch 1 and 8; the tables and the log are written under ``--out``.

    python benchmarks/gpu_end_to_end.py --out results                 # synthetic-7b, batch 1 and 8
    python benchmarks/gpu_end_to_end.py --model synthetic-medium --batches 1 --budget 120   # a quick look
    bash benchmarks/gpu.sh                                            # a bare machine: wheels first

Steps, in this order; a step is left out, and the summary says so, when less of the budget is left than
it is expected to take, and each is stopped at its own limit:

1. ``tests/test_kernel_*.py``, the kernel compiled for this GPU against the PyTorch reference (at most 60 s);
2. ``halluguard doctor --skip-effects``: the guard's identities with this torch and transformers (at most 60 s);
3. for each batch: ``halluguard bench``'s measurement on the reference path (``HALLUGUARD_KERNEL=reference``)
   for every method and for PAI's amplification alone, then on the kernel path for the methods whose
   decode steps launch the kernel (VAR, PAI and its amplification alone, Lookback Lens, OPERA); per
   method, prompt-phase and per-token ratios against plain ``generate`` interleaved with it in this
   process, and the operation counts; a method that searches with beams (OPERA; VTI, as its official
   runs decode) is also read against plain beam search with as many beams. The budget left (less what
   step 4 needs) is shared between the batches and paths by their number of methods, and a method is
   stopped between its measured runs when its share has run out;
4. ``benchmarks/kernel_bench.py`` at batch 1 and 8 with 1k, 2k and 4k keys (the kernel against SDPA);
5. the kernel's full grid (``pytest -m kernel_grid``) with what is left.

A method that fails (out of memory, say) is reported and the next one measured; a CUDA error, which
leaves this process's CUDA context unusable, ends the benches and the run goes on with step 4.
Files under ``--out``: ``summary.md`` (the device, every table, each target met or not), ``bench.json``
(every row), ``kernel.json`` (the kernel's rows) and ``log.txt`` (everything the steps printed).
Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_ENV = "HALLUGUARD_KERNEL"
# the whole-generate targets per decoded token: the ratio to plain greedy decoding, or for a method that
# searches with beams (OPERA; VTI as its official runs decode) to plain beam search with as many beams
TARGETS = {
    "vhr": 1.10,
    "var": 1.10,
    "pai, amplification": 1.10,
    "lookback": 1.10,
    "pai": 1.30,
    "vcd": 1.30,
    "avc": 1.30,
    "decore": 1.30,
    "opera": 1.50,
}
PAI_AMPLIFICATION = ("pai, amplification", "pai", {"use_cfg": False})
# the methods whose decode steps launch the kernel on a GPU (bench --ops under the interpreter: Triton
# launches per token above 0); the others never reach it, and their kernel-path rows would repeat
KERNEL_METHODS = ("var", "pai", "lookback", "opera")
KERNEL_BENCH_S = 45.0  # kept from the benches for the kernel against SDPA (the grid takes what is left)
KERNEL_SDPA_TARGET = 2.0  # the kernel's time per call at batch 1, 1k-4k keys, at most this times SDPA's


class Run:
    """The budget, the log and the summary of one run."""

    def __init__(self, out: Path, budget_s: float):
        out = out.resolve()  # the steps run in the repository's root, whatever the caller's folder
        self.out, self.deadline = out, time.monotonic() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="halluguard-gpu-")  # the stand-ins' files, outside --out
        self.log_file = (out / "log.txt").open("w")
        self.summary: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def close(self) -> None:
        self.log_file.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def log(self, text: str) -> None:
        print(text, flush=True)
        self.log_file.write(text + "\n")
        self.log_file.flush()

    def note(self, text: str = "") -> None:
        self.summary.append(text)
        (self.out / "summary.md").write_text("\n".join(self.summary) + "\n")

    def command(self, title: str, argv: list[str], expected_s: float, cap_s: float, env: dict | None = None) -> str:
        """Run ``argv`` for at most ``cap_s`` (and what is left); its output goes to the log, and one line
        on how it ended to the summary. Returns the output ('' when not run)."""
        if self.left() < expected_s:
            self.note(f"- {title}: not run ({self.left():.0f} s of the budget left, about {expected_s:.0f} s needed)")
            return ""
        self.log(f"== {title}: {' '.join(argv)}")
        start = time.monotonic()
        try:
            done = subprocess.run(
                argv, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                timeout=max(1.0, min(cap_s, self.left())),
            )  # fmt: skip
            output, ended = done.stdout + done.stderr, f"exit {done.returncode}"
        except subprocess.TimeoutExpired as err:
            output = _text(err.stdout) + _text(err.stderr)
            ended = "stopped at its time limit"
        self.log(output)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        self.note(f"- {title}: {ended} in {time.monotonic() - start:.0f} s; last line: `{last}`")
        return output


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _release_memory() -> None:
    """Give the GPU memory of a failed step back to the device (nothing without CUDA, nor where a CUDA
    error left the context unusable)."""
    import gc

    import torch

    gc.collect()
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _cuda_broken(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA error, after which every CUDA call of this process fails."""
    return "CUDA error" in str(err)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def environment(run: Run) -> None:
    import torch
    import transformers

    import halluguard

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    run.note(f"# End to end on {device}")
    run.note()
    run.note(
        f"torch {torch.__version__}, transformers {transformers.__version__}, halluguard {halluguard.__version__}, "
        f"triton {_version('triton')}, Python {sys.version.split()[0]}"
    )
    run.note()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def bench_specs(path: str) -> list[tuple[str, str, dict]]:
    """``(label, spec, fields)`` to measure on a path, the targets first."""
    from halluguard.registry import list_methods

    order = [*TARGETS, *(m for m in list_methods() if m not in TARGETS)]
    specs = [PAI_AMPLIFICATION if label == PAI_AMPLIFICATION[0] else (label, label, {}) for label in order]
    if path == "kernel":
        specs = [s for s in specs if s[1] in KERNEL_METHODS]
    return specs


def kernel_reachable(model) -> bool:
    """Whether the kernel can run this model's attention: on a GPU, or on CPU under Triton's interpreter."""
    from halluguard.kernels._compat import HAS_TRITON, interpreting

    return HAS_TRITON and (model.device.type == "cuda" or interpreting())


def measure_path(
    run: Run, model, inputs, batch: int, path: str, args, deadline: float, shared: dict
) -> tuple[list[dict], list[str], bool]:
    """Every spec of ``bench_specs(path)`` measured on ``path`` (reference or kernel), one ``measure`` each,
    until ``deadline``: the rows as dicts with the batch, the path and the plain row they were
    interleaved with, a line for each spec not measured, and whether a CUDA error stopped the
    measuring (nothing more can run on the GPU in this process). ``shared`` is ``measure``'s, for the
    calls on this batch."""
    from halluguard import bench
    from halluguard.bench import synthetic

    os.environ[KERNEL_ENV] = "reference" if path == "reference" else "triton"
    names = {spec for _, spec, _ in bench_specs(path)}
    stand_ins = synthetic.stand_ins(args.model, names, run.scratch) if args.model in synthetic.SHAPES else {}

    def in_time() -> None:
        if time.monotonic() > deadline:
            raise bench.BenchError("stopped: its share of the budget ran out")

    rows, notes, took = [], [], []  # took: seconds each measured spec took
    for label, spec, fields in bench_specs(path):
        where = f"- batch {batch}, {path} path, {label}"
        if deadline - time.monotonic() < (statistics.median(took) if took else 10.0):
            notes.append(f"{where}: not measured (its share of the budget ran out)")
            continue
        start, failed = time.monotonic(), None
        overrides = {spec: {**stand_ins.get(spec, {}), **fields}}
        try:
            measured = bench.measure(
                model, None, inputs, [spec], args.new_tokens, args.repeats, overrides, echo=run.log,
                checkpoint=in_time, ops=True, shared=shared,
            )  # fmt: skip
        except Exception as err:  # one method's failure (out of memory, say) is reported, and the run goes on
            failed = f"{type(err).__name__}: {_first_line(err)}"
            run.log(traceback.format_exc())
            if _cuda_broken(err):
                notes.append(f"{where}: failed: {failed}; the benches end here")
                return rows, notes, True
        if failed is not None:
            notes.append(f"{where}: failed: {failed}")
            _release_memory()  # outside the handler, so that the failed call's tensors can go
            continue
        plain, row, *searches = (dataclasses.asdict(r) for r in measured)  # searches: plain beam search
        search = {"search": searches[0]} if searches else {}
        rows.append({**row, "method": label, "batch": batch, "path": path, "plain": plain, **search})
        took.append(time.monotonic() - start)
    return rows, notes, False


def bench_table(rows: list[dict]) -> list[str]:
    """One markdown table of the rows of one batch and path, with each target."""
    lines = [
        "| method | plain ms/token | guarded ms/token | per-token ratio (min-max) | prompt ratio | extra ops / layer / "
        "step | launches / token | target | met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio, low, high = r["token_ratio"], *r["token_ratio_range"]
        shown = f"{ratio:.2f}x ({low:.2f}-{high:.2f})"
        target, met = TARGETS.get(r["method"]), "-"
        if "search" in r:  # a method that searches with beams is read against the same search
            ratio = r["token_ms"] / r["search"]["token_ms"]
            shown += f"; {ratio:.2f}x of {r['search']['method']}"
        if target is not None:
            met = "yes" if ratio <= target else "**no**"
        lines.append(
            f"| {r['method']} | {r['plain']['token_ms']:.1f} | {r['token_ms']:.1f} | {shown} | "
            f"{r['prompt_ratio']:.2f}x | "
            f"{r['extra_ops_per_layer_step']:.2f} | {r['launches_per_token']:.1f} | "
            f"{'-' if target is None else f'<= {target:.2f}x'} | {met} |"
        )
    return lines


def benches(run: Run, args, reserve_s: float) -> None:
    """The benches of every batch and path, within the budget less ``reserve_s`` (the later steps'),
    shared between the sections by their number of methods (what one leaves goes to the next)."""
    from halluguard import bench

    if run.left() - reserve_s < 60:
        run.note("- bench: not run (under 60 s of the budget left for it)")
        return
    start = time.monotonic()
    model, _, inputs, name = bench.load(args.model, max(args.batches), args.device, args.dtype)
    run.log(f"== {name} built in {time.monotonic() - start:.0f} s")
    sections = [(batch, path) for batch in args.batches for path in ("reference", "kernel")]
    if not kernel_reachable(model):
        run.note(
            "- kernel path: not run (the kernel needs Triton and the model on a CUDA device, or TRITON_INTERPRET=1)"
        )
        run.note()
        sections = [(batch, path) for batch, path in sections if path == "reference"]
    before = os.environ.get(KERNEL_ENV)
    try:
        _measure_sections(run, model, inputs, name, sections, args, reserve_s)
    finally:  # the later steps choose their own path
        if before is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = before
        del model
        _release_memory()


def _measure_sections(run: Run, model, inputs, name: str, sections, args, reserve_s: float) -> None:
    """Each section's table, then a line for each of its methods not measured."""
    all_rows, shared = [], {}  # shared: per batch, what does not depend on the method or the path
    for index, (batch, path) in enumerate(sections):
        weights = [len(bench_specs(p)) for _, p in sections[index:]]
        share = (run.left() - reserve_s) * weights[0] / sum(weights)
        batch_inputs = {k: v[:batch] for k, v in inputs.items()}
        batch_shared = shared.setdefault(batch, {})
        deadline = time.monotonic() + share
        rows, notes, broken = measure_path(run, model, batch_inputs, batch, path, args, deadline, batch_shared)
        all_rows += rows
        (run.out / "bench.json").write_text(json.dumps({"model": name, "rows": all_rows}, indent=1))
        setting = f"batch {batch}, {path} path, {args.new_tokens} new tokens, median of {args.repeats}"
        run.note(f"## {name}: {setting}")
        run.note()
        for line in bench_table(rows) if rows else []:
            run.note(line)
        run.note()
        for line in notes:
            run.note(line)
        if notes:
            run.note()
        if broken:
            return


def kernel_table(path: Path) -> list[str]:
    """The kernel's time per call against SDPA's from kernel_bench's rows, each case with its target
    (batch 1, 1k-4k keys: at most ``KERNEL_SDPA_TARGET`` times SDPA's)."""
    if not path.is_file():
        return []
    lines = ["| batch | keys | case | µs per call | SDPA µs | ratio | target | met? |", "|---" * 8 + "|"]
    for row in json.loads(path.read_text()):
        sdpa = row["sdpa ms"] * 1e3
        for case in (key[: -len(" ms")] for key in row if key.startswith("kernel ") and key.endswith(" ms")):
            us = row[f"{case} ms"] * 1e3
            target = KERNEL_SDPA_TARGET if row["batch"] == 1 and 1024 <= row["cache"] <= 4096 else None
            met = "-" if target is None else ("yes" if us <= target * sdpa else "**no**")
            lines.append(
                f"| {row['batch']} | {row['cache']} | {case} | {us:.1f} | {sdpa:.1f} | {us / sdpa:.2f}x | "
                f"{'-' if target is None else f'<= {target:.1f}x'} | {met} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-results", help="folder for the tables and the log")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--model", default="synthetic-7b", help="a bench model (default synthetic-7b)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: the GPU")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--skip", nargs="*", default=[], choices=("tests", "bench", "kernel", "doctor", "grid"))
    args = parser.parse_args()
    if min(args.batches) < 1 or args.new_tokens < 1 or args.repeats < 1 or args.budget <= 0:
        parser.error("--batches, --new-tokens and --repeats need whole numbers >= 1, --budget a positive time")
    run = Run(Path(args.out), args.budget)
    try:
        steps(run, args)
    finally:
        run.log(f"== done, {run.left():.0f} s of the budget left")
        run.close()
    return 0


def steps(run: Run, args) -> None:
    """The steps of the module docstring, in its order."""
    environment(run)
    python = sys.executable
    kernel_tests = ["tests/test_kernel_decode_attention.py", "tests/test_kernel_dispatch.py"]
    if "tests" not in args.skip:
        run.command("kernel tests", [python, "-m", "pytest", "-q", "-x", *kernel_tests], expected_s=10, cap_s=60)
    if "doctor" not in args.skip:
        doctor = [python, "-m", "halluguard", "doctor", "--skip-effects"]
        run.command("halluguard doctor --skip-effects", doctor, expected_s=10, cap_s=60)
    if "bench" not in args.skip:
        try:
            benches(run, args, reserve_s=0.0 if "kernel" in args.skip else KERNEL_BENCH_S)
        except Exception as err:  # the model could not be built or moved: the other steps still run
            run.note(f"- bench: failed: {type(err).__name__}: {_first_line(err)}")
            run.log(traceback.format_exc())
        _release_memory()
    if "kernel" not in args.skip:
        kernel_json = run.out / "kernel.json"
        kernel_json.unlink(missing_ok=True)  # no earlier run's rows in this run's table
        argv = [python, "benchmarks/kernel_bench.py", "--cache", "1024", "2048", "4096", "--batch", "1", "8"]
        argv += ["--dtype", "bfloat16"]  # the 7B model's
        run.command("kernel against SDPA", [*argv, "--json", str(kernel_json)], expected_s=20, cap_s=KERNEL_BENCH_S)
        table = kernel_table(kernel_json)
        if table:
            run.note()
            run.note("## The kernel against SDPA, per call")
            run.note()
            for line in table:
                run.note(line)
            run.note()
    if "grid" not in args.skip:
        run.command("kernel grid", [python, "-m", "pytest", "-q", "-m", "kernel_grid", *kernel_tests[:1]], 20, 600)


if __name__ == "__main__":
    sys.exit(main())
