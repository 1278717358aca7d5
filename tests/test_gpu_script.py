"""``benchmarks/gpu_end_to_end.py``, the budgeted run for a GPU machine: its tables and its budget,
checked on CPU (the timings themselves are not what is tested)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_end_to_end.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_end_to_end", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_table_holds_each_case_to_its_target(tmp_path):
    rows = [
        {"cache": 1024, "batch": 1, "sdpa ms": 0.020, "kernel none ms": 0.030, "kernel var ms": 0.050},
        {"cache": 16384, "batch": 1, "sdpa ms": 0.100, "kernel none ms": 0.300, "reference var ms": 1.0},
    ]
    (tmp_path / "kernel.json").write_text(json.dumps(rows))
    table = _script().kernel_table(tmp_path / "kernel.json")
    assert table[2] == "| 1 | 1024 | kernel none | 30.0 | 20.0 | 1.50x | <= 2.0x | yes |"
    assert table[3] == "| 1 | 1024 | kernel var | 50.0 | 20.0 | 2.50x | <= 2.0x | **no** |"
    assert table[4] == "| 1 | 16384 | kernel none | 300.0 | 100.0 | 3.00x | - | - |"  # no target past 4k keys
    assert len(table) == 5  # the reference path is not the kernel
    assert _script().kernel_table(tmp_path / "absent.json") == []


def test_bench_table_reads_a_beam_search_against_the_same_search():
    row = {
        "method": "opera", "token_ms": 30.0, "token_ratio": 3.0, "token_ratio_range": (2.9, 3.1), "prompt_ratio": 2.0,
        "extra_ops_per_layer_step": 22.0, "launches_per_token": 0.0, "plain": {"token_ms": 10.0},
        "search": {"method": "plain, 5 beams", "token_ms": 25.0},
    }  # fmt: skip
    vhr = dict(row, method="vhr", token_ms=10.5, token_ratio=1.05, token_ratio_range=(1.0, 1.1))
    del vhr["search"]
    lines = _script().bench_table([row, vhr])
    assert "3.00x (2.90-3.10); 1.20x of plain, 5 beams | 2.00x | 22.00 | 0.0 | <= 1.50x | yes |" in lines[2]
    assert lines[3].endswith("| 1.05x (1.00-1.10) | 2.00x | 22.00 | 0.0 | <= 1.10x | yes |")


def test_a_cuda_error_ends_the_benches_and_the_kernel_setting_comes_back(tmp_path, monkeypatch):
    """After a CUDA error every CUDA call of the process fails: the benches stop there, say why, and
    leave ``HALLUGUARD_KERNEL`` as they found it for the steps that follow."""
    import argparse

    from halluguard import bench

    script, calls = _script(), []

    def broken(*args, **kwargs):
        calls.append(args[3])
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(bench, "measure", broken)
    monkeypatch.setenv(script.KERNEL_ENV, "auto")  # the benches set "reference", then give this back
    run = script.Run(tmp_path, budget_s=600)
    args = argparse.Namespace(model="testbed", batches=[1, 2], new_tokens=1, repeats=1, device=None, dtype="auto")
    script.benches(run, args, reserve_s=0)
    run.close()
    summary = (tmp_path / "summary.md").read_text()
    assert calls == [["vhr"]]  # the first method, then nothing more
    assert "- batch 1, reference path, vhr: failed: RuntimeError: CUDA error: an illegal memory access" in summary
    assert "the benches end here" in summary and "batch 2" not in summary
    assert os.environ[script.KERNEL_ENV] == "auto"


@pytest.mark.slow
def test_the_run_measures_each_batch_within_its_budget_and_says_what_it_left_out(tmp_path):
    argv = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--model", "testbed", "--batches", "1", "2"]
    argv += ["--new-tokens", "1", "--repeats", "1", "--budget", "180", "--skip", "tests", "kernel", "grid"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it on CPU
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# End to end on ")
    for batch in (1, 2):
        assert f"## testbed: batch {batch}, reference path, 1 new tokens, median of 1" in summary
    assert (
        "kernel path: not run (the kernel needs Triton and the model on a CUDA device, or TRITON_INTERPRET=1)"
        in summary
    )
    assert "| vhr |" in summary and "| <= 1.10x |" in summary
    # a method that cannot run (the test model has no sink table for VAR) is reported, and the run goes on
    assert "- batch 1, reference path, var: failed: BenchError: no method could run on this model" in summary
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {(r["batch"], r["path"]) for r in rows} == {(1, "reference"), (2, "reference")}
    assert "- halluguard doctor --skip-effects: " in summary  # the guard's identities, before the benches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "log.txt", "summary.md"]
