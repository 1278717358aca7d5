"""End-to-end CHAIR and POPE runs on the shipped test model's world: rows, resume, errors, report."""

import json

import pytest

from halluguard import cli
from halluguard.eval import runner
from halluguard.eval.report import report


@pytest.fixture(scope="module")
def testbed():
    model, processor, name = runner.load_model("testbed")
    return model, processor, name


def chair_run(testbed, out, guard=None, num_images=10):
    model, processor, name = testbed
    return runner.run_chair(
        model,
        processor,
        name,
        out,
        guard,
        dataset="testbed",
        num_images=num_images,
        settings=runner.Settings(max_new_tokens=40, batch_size=4),
    )


def test_chair_run_records_everything(testbed, tmp_path):
    results = chair_run(testbed, tmp_path / "run")
    m = results["metrics"]
    assert m["n"] == 10 and 0 <= m["chair_i"] <= 100 and m["recall"] > 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("model", "methods", "decoding", "image_ids", "version", "prompt", "data_files"):
        assert key in saved
    assert saved["decoding"]["max_new_tokens"] == 40
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["output"] for r in rows)


class Interrupted(Exception):
    pass


class DyingGuard:
    """Stands in for a guard whose process is killed after a few batches."""

    methods = []

    def __init__(self, model, batches):
        self.model, self.left = model, batches

    def generate(self, **kwargs):
        if self.left == 0:
            raise Interrupted
        self.left -= 1
        return self.model.generate(**kwargs)


def test_resume_after_a_kill_gives_the_uninterrupted_totals(testbed, tmp_path):
    whole = chair_run(testbed, tmp_path / "whole")
    with pytest.raises(Interrupted):
        chair_run(testbed, tmp_path / "killed", guard=DyingGuard(testbed[0], batches=1))
    samples = tmp_path / "killed" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 4
    with open(samples, "a") as f:
        f.write('{"key": "torn')  # a line cut off by the kill
    resumed = chair_run(testbed, tmp_path / "killed")
    assert resumed["metrics"] == whole["metrics"]
    assert len(samples.read_text().splitlines()) == 10


def test_missing_images_become_error_rows(testbed, tmp_path):
    model, processor, name = testbed
    results = runner.run_pope(
        model,
        processor,
        name,
        tmp_path / "pope",
        dataset="coco",
        splits=["random"],
        coco_images=str(tmp_path / "no_such_folder"),
        num_questions=3,
        settings=runner.Settings(max_new_tokens=3),
    )
    assert len(results["errors"]) == 3 and "FileNotFoundError" in results["errors"][0]["error"]
    assert results["metrics"] == {}
    assert "coco_pope_random.json" in results["data_files"]


def test_pope_cli_and_report(testbed, tmp_path, capsys):
    for method, out in (("", "vanilla"), ("", "again")):
        assert (
            cli.main(
                ["eval", "pope", "--num-images", "4", "--out", str(tmp_path / out), "--batch-size", "8"]
                + (["--method", method] if method else [])
            )
            == 0
        )
    printed = capsys.readouterr().out
    assert "| random |" in printed and "results:" in printed
    chart = tmp_path / "chart.png"
    table = report([str(tmp_path / "vanilla"), str(tmp_path / "again")], chart=str(chart))
    assert table.count("| vanilla |") == 6
    assert chart.exists() and chart.stat().st_size > 1000
