"""End-to-end CHAIR and POPE runs on the shipped test model's world: rows, resume keyed by the
settings, error rows retried, sampled resume, report."""

import json
import shutil

import pytest
from PIL import Image

from halluguard import cli
from halluguard.eval import runner
from halluguard.eval.report import report
from halluguard.models import load_model
from halluguard.testbed import path as shipped_model_folder
from halluguard.testbed import world

TESTBED_CHAIR = runner.ChairTask(dataset="testbed", num_images=4)
SETTINGS = runner.RunSettings(runner.Decoding(max_new_tokens=12), batch_size=2)


@pytest.fixture(scope="module")
def testbed():
    model, processor, name = load_model("testbed")
    return model, processor, runner.model_info(model, name)


@pytest.fixture(scope="module")
def finished(testbed, tmp_path_factory):
    """A finished run with the default test settings (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(testbed, out)
    return out


def run(testbed, out, task=TESTBED_CHAIR, settings=SETTINGS, guard=None, **kwargs):
    model, processor, info = testbed
    kwargs.setdefault("info", info)
    return runner.evaluate(task, model, processor, out, guard, settings, **kwargs)


def rows(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


class Interrupted(Exception):
    pass


class CountingGuard:
    """Stands in for a guard: counts the rows it generates and dies after ``batches`` calls."""

    methods = []

    def __init__(self, model, batches=None):
        self.model, self.left, self.rows = model, batches, 0

    def generate(self, **kwargs):
        if self.left == 0:
            raise Interrupted
        if self.left is not None:
            self.left -= 1
        self.rows += kwargs["input_ids"].shape[0]
        return self.model.generate(**kwargs)


def test_chair_run_records_everything(testbed, tmp_path):
    results = run(testbed, tmp_path / "run")
    m = results["metrics"]
    assert m["n"] == 4 and 0 <= m["chair_i"] <= 100 and m["recall"] > 0
    assert m["partner_named"] in (0, 25, 50, 75, 100)  # the misleading split: is the absent partner named?
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["model"] == "testbed" and saved["split"] == "misleading" and saved["complete"]
    assert saved["decoding"]["max_new_tokens"] == 12 and saved["failed"] == {"count": 0, "first": []}
    for key in ("methods", "image_ids", "version", "prompt", "data_files", "fingerprint", "model_identity"):
        assert key in saved
    recorded = json.loads((tmp_path / "run" / runner.RUN_FILE).read_text())
    assert recorded["fingerprint"] == saved["fingerprint"]
    assert len(rows(tmp_path / "run")) == 4 and all(r["output"] for r in rows(tmp_path / "run"))


def test_resume_after_a_kill_gives_the_uninterrupted_rows(testbed, tmp_path):
    whole = run(testbed, tmp_path / "whole")
    with pytest.raises(Interrupted):
        run(testbed, tmp_path / "killed", guard=CountingGuard(testbed[0], batches=1))
    samples = tmp_path / "killed" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 2
    with open(samples, "a") as f:
        f.write('{"key": "torn')  # a line cut off by the kill
    counter = CountingGuard(testbed[0])
    resumed = run(testbed, tmp_path / "killed", guard=counter)
    assert counter.rows == 2  # only the missing rows were generated
    assert resumed["metrics"] == whole["metrics"]
    assert sorted(rows(tmp_path / "killed"), key=lambda r: r["key"]) == sorted(
        rows(tmp_path / "whole"), key=lambda r: r["key"]
    )


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(settings=runner.RunSettings(runner.Decoding(max_new_tokens=3), batch_size=2)), "max_new_tokens"),
        (dict(settings=runner.RunSettings(runner.Decoding(max_new_tokens=12, num_beams=2))), "num_beams"),
        (dict(settings=runner.RunSettings(runner.Decoding(max_new_tokens=12), seed=1)), "seed"),
        (dict(task=runner.ChairTask(dataset="testbed", num_images=4, prompt="Describe the image.")), "prompt"),
    ],
)
def test_a_settings_change_refuses_to_resume(testbed, finished, tmp_path, change, named):
    shutil.copytree(finished, tmp_path / "run")
    before = (tmp_path / "run" / "samples.jsonl").read_bytes()
    with pytest.raises(runner.EvalError, match=rf"other settings \(.*{named}.*--overwrite"):
        run(testbed, tmp_path / "run", **change)
    assert (tmp_path / "run" / "samples.jsonl").read_bytes() == before


def test_overwrite_starts_afresh(testbed, finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    short = runner.RunSettings(runner.Decoding(max_new_tokens=2), batch_size=2)
    results = run(testbed, tmp_path / "run", settings=short, overwrite=True)
    assert results["decoding"]["max_new_tokens"] == 2 and len(rows(tmp_path / "run")) == 4
    assert all(len(r["output"].split()) <= 2 for r in rows(tmp_path / "run"))


def test_another_method_config_refuses_to_resume(testbed, tmp_path):
    import halluguard as hg

    model, processor, _ = testbed
    one = runner.ChairTask(dataset="testbed", num_images=1)
    with hg.wrap(model, processor, hg.get_config("pai", alpha=0.5)) as guard:
        run(testbed, tmp_path / "run", task=one, guard=guard)
    refused = pytest.raises(runner.EvalError, match=r"methods\.pai\.alpha: 0\.5 -> 5\.0")
    with hg.wrap(model, processor, hg.get_config("pai", alpha=5.0)) as guard, refused:
        run(testbed, tmp_path / "run", task=one, guard=guard)
    with pytest.raises(runner.EvalError, match=r"methods: 'pai' -> 'none'"):
        run(testbed, tmp_path / "run", task=one)


def test_another_model_with_the_same_folder_name_refuses_to_resume(testbed, finished, tmp_path):
    info = testbed[2]
    source = shipped_model_folder()
    for name in ("a", "b"):
        shutil.copytree(source, tmp_path / name / "model")
    weights = next((tmp_path / "b" / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    a, b = (runner.folder_hash(tmp_path / name / "model") for name in ("a", "b"))
    assert a == runner.folder_hash(source) and a != b  # the hash follows the files, not the path
    shutil.copytree(finished, tmp_path / "run")
    run(testbed, tmp_path / "run", info=runner.ModelInfo("a/model", {**info.identity, "files": a}))  # resumes
    with pytest.raises(runner.EvalError, match=r"model\.files"):
        run(testbed, tmp_path / "run", info=runner.ModelInfo("b/model", {**info.identity, "files": b}))


def test_fewer_or_more_samples_resume_the_same_rows(testbed, finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    counter = CountingGuard(testbed[0])
    results = run(testbed, tmp_path / "run", task=runner.ChairTask(dataset="testbed", num_images=5), guard=counter)
    assert counter.rows == 1 and results["metrics"]["n"] == 5
    results = run(testbed, tmp_path / "run", task=runner.ChairTask(dataset="testbed", num_images=2), guard=counter)
    assert counter.rows == 1 and results["metrics"]["n"] == 2


def test_rows_without_a_run_record_or_for_other_samples_are_refused(testbed, finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "run" / runner.RUN_FILE).unlink()
    with pytest.raises(runner.EvalError, match="no run.json"):
        run(testbed, tmp_path / "run")
    shutil.copytree(finished, tmp_path / "other")
    lines = (tmp_path / "other" / "samples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["image_id"] += 1
    (tmp_path / "other" / "samples.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(runner.EvalError, match="made for another sample"):
        run(testbed, tmp_path / "other")


def coco_folder(tmp_path, questions, missing=()):
    """COCO file names for ``questions``' images, drawn from testbed scenes; ``missing`` left out."""
    folder = tmp_path / "coco"
    folder.mkdir(exist_ok=True)
    images = sorted({q["image"] for q in questions} - set(missing))
    for name, scene in zip(images, world.scenes("test", len(images), 0)):
        scene.render().save(folder / name)
    return folder


def test_error_rows_are_counted_explained_and_retried(testbed, tmp_path, capsys):
    from halluguard.eval import pope

    questions = pope.load_questions("coco", "random")[:7]  # 6 questions on one image, 1 on the next
    broken = questions[6]["image"]
    assert {q["image"] for q in questions[:6]} == {questions[0]["image"]} != {broken}
    folder = coco_folder(tmp_path, questions, missing={broken})
    task = runner.PopeTask(dataset="coco", splits=("random",), num_questions=7, coco_images=str(folder))
    settings = runner.RunSettings(runner.Decoding(max_new_tokens=3))
    results = run(testbed, tmp_path / "pope", task=task, settings=settings)
    assert results["failed"]["count"] == 1 and not results["complete"]
    assert (
        broken in results["failed"]["first"][0]["error"]
        and "FileNotFoundError" in results["failed"]["first"][0]["error"]
    )
    assert results["metrics"]["random"]["n"] == 6
    (folder / broken).write_bytes(b"not a jpeg")  # now corrupt: still an error row, with its reason
    results = run(testbed, tmp_path / "pope", task=task, settings=settings)
    assert results["failed"]["count"] == 1 and "UnidentifiedImageError" in results["failed"]["first"][0]["error"]
    Image.new("RGB", (32, 32), "white").save(folder / broken, format="JPEG")
    counter = CountingGuard(testbed[0])
    results = run(testbed, tmp_path / "pope", task=task, settings=settings, guard=counter)
    assert counter.rows == 1 and results["failed"]["count"] == 0 and results["complete"]
    assert results["metrics"]["random"]["n"] == 7
    assert len(rows(tmp_path / "pope")) == 7  # the old error rows are gone from the file


def test_a_run_whose_rows_all_fail_stops_without_results(testbed, tmp_path):
    task = runner.PopeTask(dataset="coco", splits=("random",), num_questions=3, coco_images=str(tmp_path / "none"))
    with pytest.raises(runner.EvalError, match=r"no answer could be scored: all 3 rows failed \(FileNotFoundError"):
        run(testbed, tmp_path / "pope", task=task, settings=runner.RunSettings(runner.Decoding(3)))
    assert not (tmp_path / "pope" / "results.json").exists()
    assert len(rows(tmp_path / "pope")) == 3  # kept, to be retried


def test_sampled_resume_equals_uninterrupted(testbed, tmp_path):
    sampled = runner.RunSettings(runner.Decoding(max_new_tokens=8, do_sample=True, temperature=1.5), seed=3)
    run(testbed, tmp_path / "whole", settings=sampled)
    with pytest.raises(Interrupted):
        run(testbed, tmp_path / "killed", settings=sampled, guard=CountingGuard(testbed[0], batches=2))
    run(testbed, tmp_path / "killed", settings=sampled)
    whole, resumed = rows(tmp_path / "whole"), rows(tmp_path / "killed")
    assert sorted(whole, key=lambda r: r["key"]) == sorted(resumed, key=lambda r: r["key"])
    other = runner.RunSettings(runner.Decoding(max_new_tokens=8, do_sample=True, temperature=1.5), seed=4)
    run(testbed, tmp_path / "seed4", settings=other)
    assert [r["output"] for r in rows(tmp_path / "seed4")] != [r["output"] for r in whole]  # the seed matters


def test_row_seeds_depend_on_run_seed_and_row_id_only():
    assert runner.row_seed(0, "a") == runner.row_seed(0, "a")
    assert len({runner.row_seed(s, k) for s in (0, 1) for k in ("a", "b")}) == 4
    assert 0 <= runner.row_seed(12345, "random/7") < 2**63


def test_pope_cli_and_report(tmp_path, capsys):
    argv = ["eval", "pope", "--num-images", "1", "--out", str(tmp_path / "vanilla"), "--max-new-tokens", "3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| testbed | testbed | vanilla | random |" in printed and "results:" in printed
    shutil.copytree(tmp_path / "vanilla", tmp_path / "again")
    chart = tmp_path / "chart.png"
    table = report([str(tmp_path / "vanilla"), str(tmp_path / "again")], chart=str(chart))
    assert table.count("| testbed | testbed | vanilla |") == 6
    assert chart.exists() and chart.stat().st_size > 1000


def test_dtype_and_device_apply_to_the_test_model(tmp_path):
    import torch

    model, processor, name = load_model("testbed", dtype="fp16", device="cpu")
    info = runner.model_info(model, name)
    assert model.dtype == torch.float16 and info.identity["dtype"] == "torch.float16"
    task = runner.ChairTask(dataset="testbed", num_images=1)
    results = runner.evaluate(task, model, processor, tmp_path / "run", settings=SETTINGS, info=info)
    assert results["model_identity"]["dtype"] == "torch.float16" and results["metrics"]["n"] == 1


def test_runs_that_decode_differently_get_folders_of_their_own():
    def folder(method="", **decoding):
        return runner.default_out_dir(TESTBED_CHAIR, "testbed", method, runner.Decoding(64, **decoding)).name

    assert folder() == "chair-testbed-misleading-testbed-vanilla"
    assert folder("pai+vhr") == "chair-testbed-misleading-testbed-pai_vhr"
    assert folder(num_beams=5) == "chair-testbed-misleading-testbed-vanilla-beams5"
    assert folder("vcd", do_sample=True) == "chair-testbed-misleading-testbed-vcd-sampled"
    assert (
        folder(do_sample=True, temperature=0.9, top_p=0.95)
        == "chair-testbed-misleading-testbed-vanilla-sampled-t0.9-p0.95"
    )
    assert folder(temperature=0.9) == folder()  # greedy search ignores the sampling settings
