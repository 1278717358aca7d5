"""On one CUDA GPU, end to end, inside a time budget: the kernel's tests, what each method costs a whole
guarded ``generate`` of a 7B-shaped model against plain, the kernel against SDPA at batch 1 and 8, and
``halluguard doctor``; the tables and the log are written under ``--out``.

    python benchmarks/gpu_end_to_end.py --out results                 # synthetic-7b, batch 1 and 8
    python benchmarks/gpu_end_to_end.py --model synthetic-medium --batches 1 --budget 120   # a quick look
    bash benchmarks/gpu.sh                                            # a bare machine: wheels first

Steps, in this order; a step is left out, and the summary says so, when less of the budget is left than
it is expected to take (the benches are cut method by method):

1. ``tests/test_kernel_*.py``, the kernel compiled for this GPU against the PyTorch reference;
2. for each batch: ``halluguard bench``'s measurement on the reference path (``HALLUGUARD_KERNEL=reference``)
   for every method and for PAI's amplification alone, then on the kernel path for the methods whose
   attention the kernel computes; per method, prompt-phase and per-token ratios against plain
   ``generate`` interleaved with it in this process, and the operation counts; OPERA is also read
   against plain beam search with its beams;
3. ``benchmarks/kernel_bench.py`` at batch 1 and 8 with 1k, 2k and 4k keys (the kernel against SDPA);
4. ``halluguard doctor``;
5. the kernel's full grid (``pytest -m kernel_grid``) with what is left.

Files under ``--out``: ``summary.md`` (the device, every table, each target met or not), ``bench.json``
(every row), ``kernel.json`` (the kernel's rows) and ``log.txt`` (everything the steps printed).
Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
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
# seconds kept from the benches for the steps after them (the grid takes what is left)
RESERVE_S = {"kernel": 45.0, "doctor": 30.0}
DOCTOR_FULL_S = 240.0  # budget left under which doctor checks the identities only
KERNEL_SDPA_TARGET = 2.0  # the kernel's time per call at batch 1, 1k-4k keys, at most this times SDPA's


class Run:
    """The budget, the log and the summary of one run."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="halluguard-gpu-")  # the stand-ins' files, outside --out
        self.log_file = (out / "log.txt").open("w")
        self.summary: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

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
    """Give the GPU memory of a failed step back to the device (no-op without CUDA)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def measure_path(run: Run, model, inputs, batch: int, path: str, args, deadline: float) -> list[dict]:
    """Every spec of ``bench_specs(path)`` measured on ``path`` (reference or kernel), one ``measure`` each,
    while there is time before ``deadline``; the rows as dicts with the batch, the path and the plain row they were
    interleaved with."""
    from halluguard import bench
    from halluguard.bench import synthetic

    os.environ[KERNEL_ENV] = "reference" if path == "reference" else "triton"
    names = {spec for _, spec, _ in bench_specs(path)}
    stand_ins = synthetic.stand_ins(args.model, names, run.scratch) if args.model in synthetic.SHAPES else {}
    rows, took = [], []  # seconds each measured spec took
    for label, spec, fields in bench_specs(path):
        if deadline - time.monotonic() < (statistics.median(took) if took else 10.0):
            run.note(f"- batch {batch}, {path} path, {label}: not measured (its share of the budget ran out)")
            continue
        start = time.monotonic()
        overrides = {spec: {**stand_ins.get(spec, {}), **fields}}
        try:
            measured = bench.measure(
                model, None, inputs, [spec], args.new_tokens, args.repeats, overrides, echo=run.log, ops=True
            )
        except Exception as err:  # one method's failure (out of memory, say) is reported, and the run goes on
            run.note(f"- batch {batch}, {path} path, {label}: failed: {type(err).__name__}: {_first_line(err)}")
            run.log(traceback.format_exc())
            _release_memory()
            continue
        plain, row, *searches = (dataclasses.asdict(r) for r in measured)  # searches: plain beam search
        search = {"search": searches[0]} if searches else {}
        rows.append({**row, "method": label, "batch": batch, "path": path, "plain": plain, **search})
        took.append(time.monotonic() - start)
    return rows


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
        run.note("- kernel path: not run (no CUDA device, and TRITON_INTERPRET is not set)")
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
    all_rows = []
    for index, (batch, path) in enumerate(sections):
        weights = [len(bench_specs(p)) for _, p in sections[index:]]
        share = (run.left() - reserve_s) * weights[0] / sum(weights)
        batch_inputs = {k: v[:batch] for k, v in inputs.items()}
        rows = measure_path(run, model, batch_inputs, batch, path, args, time.monotonic() + share)
        all_rows += rows
        (run.out / "bench.json").write_text(json.dumps({"model": name, "rows": all_rows}, indent=1))
        if rows:
            setting = f"batch {batch}, {path} path, {args.new_tokens} new tokens, median of {args.repeats}"
            run.note(f"## {name}: {setting}")
            run.note()
            for line in bench_table(rows):
                run.note(line)
            run.note()


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
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
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
    environment(run)
    python = sys.executable
    kernel_tests = ["tests/test_kernel_decode_attention.py", "tests/test_kernel_dispatch.py"]
    if "tests" not in args.skip:
        run.command("kernel tests", [python, "-m", "pytest", "-q", "-x", *kernel_tests], expected_s=20, cap_s=90)
    if "bench" not in args.skip:
        try:
            benches(run, args, reserve_s=sum(RESERVE_S[step] for step in RESERVE_S if step not in args.skip))
        except Exception as err:  # the model could not be built or moved: the other steps still run
            run.note(f"- bench: failed: {type(err).__name__}: {_first_line(err)}")
            run.log(traceback.format_exc())
            _release_memory()
    if "kernel" not in args.skip:
        kernel_json = run.out / "kernel.json"
        argv = [
            python,
            "benchmarks/kernel_bench.py",
            "--cache",
            "1024",
            "2048",
            "4096",
            "--batch",
            "1",
            "8",
            "--dtype",
            "bfloat16",
        ]
        run.command("kernel against SDPA", [*argv, "--json", str(kernel_json)], expected_s=20, cap_s=60)
        table = kernel_table(kernel_json)
        if table:
            run.note()
            run.note("## The kernel against SDPA, per call")
            run.note()
            for line in table:
                run.note(line)
            run.note()
    if "doctor" not in args.skip:  # the method effects too where the budget allows (minutes on a CPU)
        doctor = [python, "-m", "halluguard", "doctor", *([] if run.left() > DOCTOR_FULL_S else ["--skip-effects"])]
        run.command("halluguard " + " ".join(doctor[3:]), doctor, expected_s=10, cap_s=run.left())
    if "grid" not in args.skip:
        run.command("kernel grid", [python, "-m", "pytest", "-q", "-m", "kernel_grid", *kernel_tests[:1]], 20, 600)
    run.log(f"== done, {run.left():.0f} s of the budget left")
    shutil.rmtree(run.scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
