"""Sharded evaluation with real processes on CPU: two workers under torchrun, one of them killed,
the run resumed under accelerate launch; and the launcher worlds that are refused."""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from halluguard import cli
from halluguard.eval import runner

WORKER = str(Path(__file__).parent / "sharded_cli.py")
POPE = ["eval", "pope", "--num-images", "1", "--max-new-tokens", "3", "--batch-size", "4"]  # 18 samples, 5 batches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], argv: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", *launcher, WORKER, *argv],
        cwd=cwd,
        env={**environment, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def torchrun():
    return ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def accelerate_launch():
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]
    return ["accelerate.commands.launch", *flags, "--mixed_precision", "no", "--dynamo_backend", "no"]


def raw_keys(out: Path) -> list[str]:
    keys = []
    for path in sorted(out.glob("samples*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by the kill
                keys.append(json.loads(line)["key"])
    return keys


@pytest.mark.slow
def test_two_killed_and_resumed_processes_equal_one(tmp_path, capsys):
    assert cli.main([*POPE, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    one = json.loads((tmp_path / "one" / "results.json").read_text())

    killed = launch(torchrun(), [*POPE, "--out", str(tmp_path / "two")], tmp_path, KILL_RANK="1:2")
    assert killed.returncode != 0 and not (tmp_path / "two" / "results.json").exists()
    rank1 = (tmp_path / "two" / "samples.rank1.jsonl").read_text().splitlines()
    assert len(rank1) == 4  # its first batch, written before the kill
    assert (tmp_path / "two" / "samples.rank0.jsonl").exists()

    resumed = launch(accelerate_launch(), [*POPE, "--out", str(tmp_path / "two")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("| model | data | method | split |") == 1  # only process 0 prints
    assert (tmp_path / "two" / "samples.rank1.jsonl").read_text().splitlines()[:4] == rank1  # kept, not redone

    keys = raw_keys(tmp_path / "two")
    assert len(keys) == len(set(keys)) == one["samples"] == 18  # every sample exactly once
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and two["metrics"] == one["metrics"] and two["fingerprint"] == one["fingerprint"]
    by_key = {}
    for name in ("one", "two"):
        by_key[name] = {k: r["output"] for k, r in runner.read_all_rows(tmp_path / name).items()}
    assert by_key["one"] == by_key["two"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but no RANK"),
        ({"RANK": "1"}, "RANK is set but no WORLD_SIZE"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "rank 2 of 2"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0"),
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, "starts a single process"),
    ],
)
def test_a_launcher_world_that_cannot_be_read_is_refused(monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(runner.EvalError, match=message):
        runner.launcher_shard()


def test_no_launcher_is_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    shard = runner.launcher_shard()
    assert (shard.rank, shard.world, shard.main) == (0, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert runner.launcher_shard().world == 1


def test_batches_are_cut_from_the_whole_list():
    samples = [runner.Sample(str(i), i, None, "") for i in range(10)]
    settings = runner.RunSettings(runner.Decoding(5), batch_size=4)
    cut = runner.batches(samples, settings)
    assert [[s.key for s in b] for b in cut] == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9"]]
    sampled = runner.RunSettings(runner.Decoding(5, do_sample=True), batch_size=4)
    assert [len(b) for b in runner.batches(samples, sampled)] == [1] * 10
