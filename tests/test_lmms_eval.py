"""halluguard through lmms-eval, offline, on the shipped test model (marker ``lmms_eval``: needs
lmms-eval installed the lean way the README gives; ``python -m pytest -m lmms_eval``).

The local task asks the questions of ``halluguard eval pope --dataset testbed`` with the same prompt
and decoding, so both routes must give the same answers, with and without a method."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny_models import FAMILIES

from halluguard import cli
from halluguard.integrations.lmms_eval.tasks import write_testbed_pope

pytestmark = pytest.mark.lmms_eval

NUM_IMAGES = 4  # 24 questions
TASK = "halluguard_testbed_pope_random"
STRONG_VCD = '{"alpha": 5.0}'  # strong enough to turn some of these answers
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def lmms_eval():
    try:
        import lmms_eval.evaluator
        import lmms_eval.tasks
    except ImportError as err:
        pytest.fail(
            f"lmms-eval is not installed ({err}): pip install --no-deps lmms-eval==0.7.3 && "
            'pip install -e ".[lmms-eval]"'
        )
    return lmms_eval


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, lmms_eval):
    folder = tmp_path_factory.mktemp("lmms_tasks")
    assert write_testbed_pope(folder, splits=("random",), num_images=NUM_IMAGES) == [TASK]
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def through_lmms_eval(lmms_eval, task_dir, model_args: str, batch_size: int) -> tuple[list[str], dict]:
    from lmms_eval.tasks import TaskManager

    results = lmms_eval.evaluator.simple_evaluate(
        model="halluguard",
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=batch_size,
        log_samples=True,
        verbosity="ERROR",
    )
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples], results


def through_halluguard_eval(
    tmp_path, method: str | None = None, config: str | None = None, model: str = "testbed", batch_size: int = 4
) -> tuple[list[str], dict]:
    out = tmp_path / f"ours-{method}"
    argv = ["eval", "pope", "--model", model, "--dataset", "testbed", "--num-images", str(NUM_IMAGES)]
    argv += ["--splits", "random", "--batch-size", str(batch_size), "--out", str(out)]
    if method:
        argv += ["--method", method]
    if config:
        argv += ["--config", config]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["question_id"])
    return [r["output"] for r in rows], json.loads((out / "results.json").read_text())["metrics"]["random"]


def test_lmms_eval_finds_the_model_through_the_entry_point(lmms_eval):
    from lmms_eval.models import get_model

    from halluguard.integrations.lmms_eval.model import Halluguard

    assert get_model("halluguard") is Halluguard


def test_plain_answers_and_accuracy_match_halluguard_eval_pope(lmms_eval, task_dir, tmp_path):
    answers, results = through_lmms_eval(lmms_eval, task_dir, "pretrained=testbed", batch_size=4)
    ours, metrics = through_halluguard_eval(tmp_path)
    assert len(answers) == 6 * NUM_IMAGES
    assert answers == ours
    scores = results["results"][TASK]
    for name in ("accuracy", "precision", "recall", "f1_score", "yes_ratio"):
        assert 0.0 <= scores[f"pope_{name},none"] <= 1.0
    # every answer here is exactly "yes" or "no", so lmms-eval's exact rule and ours agree
    assert set(answers) <= {"yes", "no"}
    assert scores["pope_accuracy,none"] * 100 == pytest.approx(metrics["accuracy"])
    assert scores["pope_f1_score,none"] * 100 == pytest.approx(metrics["f1"])


def test_a_method_changes_the_answers_it_changes_in_halluguard_eval_pope(lmms_eval, task_dir, tmp_path):
    plain, _ = through_lmms_eval(lmms_eval, task_dir, "pretrained=testbed", batch_size=4)
    guarded, results = through_lmms_eval(
        lmms_eval, task_dir, f"pretrained=testbed,methods=vcd,config={STRONG_VCD}", batch_size=4
    )
    ours, _ = through_halluguard_eval(tmp_path, "vcd", STRONG_VCD)
    assert guarded == ours
    assert sum(a != b for a, b in zip(plain, guarded)) >= 1
    assert "methods=vcd" in results["config"]["model_args"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_answers_through_lmms_eval_as_through_halluguard_eval(
    lmms_eval, task_dir, tmp_path, checkpoint, family
):
    """A checkpoint folder of each family (its real processor, chat template and image processing):
    lmms-eval's answers, plain and under PAI, are those ``halluguard eval pope`` gives on it."""
    folder = checkpoint(family)
    plain, _ = through_lmms_eval(lmms_eval, task_dir, f"pretrained={folder}", batch_size=2)
    assert plain == through_halluguard_eval(tmp_path, model=folder, batch_size=2)[0]
    guarded, _ = through_lmms_eval(lmms_eval, task_dir, f"pretrained={folder},methods=pai", batch_size=2)
    assert guarded == through_halluguard_eval(tmp_path, "pai", model=folder, batch_size=2)[0]
    assert len(guarded) == 6 * NUM_IMAGES


@pytest.mark.parametrize("model_args", ["pretrained=testbed", f"pretrained=testbed,methods=vcd,config={STRONG_VCD}"])
def test_batch_sizes_one_and_four_give_the_same_answers(lmms_eval, task_dir, model_args):
    one, _ = through_lmms_eval(lmms_eval, task_dir, model_args, batch_size=1)
    four, _ = through_lmms_eval(lmms_eval, task_dir, model_args, batch_size=4)
    assert one == four


def test_the_lmms_eval_command_runs_offline_and_writes_its_results(lmms_eval, task_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        *(os.path.join(os.path.dirname(sys.executable), "lmms-eval"),),
        "--model",
        "halluguard",
        "--model_args",
        'pretrained=testbed,methods=pai+vhr,config={"pai":{"alpha":0.5},"vhr":{"alpha":1.5}}',
        "--include_path",
        str(task_dir),
        "--tasks",
        TASK,
        "--batch_size",
        "4",
        "--limit",
        "8",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    # lmms-eval exits 0 even when a run fails: its results file is what says it ran
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, done.stdout[-2000:] + done.stderr[-3000:]
    written = json.loads(files[0].read_text())
    assert 0.0 <= written["results"][TASK]["pope_accuracy,none"] <= 1.0
    assert "methods=pai+vhr" in written["config"]["model_args"]
    samples = [json.loads(line) for f in out.rglob("*_samples_*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": "nope"}, "methods: "),
        ({"methods": "pai", "config": "{alpha:"}, "config: the text is not valid JSON"),
        ({"methods": "pai+vhr", "config": '{"alpha": 1}'}, "must map each method name"),
        ({"config": '{"alpha": 1}'}, "config needs methods"),
        ({"batch_size": "auto"}, "batch_size 'auto' is not supported"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"max_new_tokens": "ten"}, "max_new_tokens must be a positive integer"),
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"temperatur": 0.5}, "unknown model_args ['temperatur']"),
    ],
)
def test_wrong_model_args_are_one_clear_error_before_the_model_loads(lmms_eval, kwargs, message):
    from halluguard.integrations.lmms_eval.model import Halluguard

    with pytest.raises(ValueError) as err:
        Halluguard(pretrained="/no/such/model", **kwargs)
    assert message in str(err.value)


def test_the_model_records_its_methods_refuses_log_likelihood_and_unwraps_on_clean(lmms_eval):
    from halluguard.integrations.lmms_eval.model import Halluguard

    model = Halluguard(pretrained="testbed", methods="pai")
    assert "pai" in model.name and model.record["methods"][0]["method"] == "pai"
    with pytest.raises(NotImplementedError, match="generation tasks"):
        model.loglikelihood([])
    model.clean()
    assert not model.guard.wrapped


TWO_ROUNDS_YAML = """task: halluguard_test_two_rounds
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: pope_random.parquet
test_split: test
output_type: generate_until_multi_round
doc_to_visual: !function halluguard.integrations.lmms_eval.tasks.doc_to_visual
doc_to_text: !function two_rounds.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 10
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function two_rounds.process_results
metric_list:
  - metric: rounds
    aggregation: mean
    higher_is_better: true
"""

TWO_ROUNDS_PY = '''
def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    """Round 0 and 1 ask the doc's question (round 1 only after round 0's answer came back); round 2 ends."""
    if round_idx is None:
        return doc["question"]
    assert len(previous_output) == round_idx and previous_round_info == (round_idx - 1 or None)
    if round_idx == 2:
        return None, None, True, previous_output, None
    return [doc["image"].convert("RGB")], doc["question"], False, previous_output, round_idx


def process_results(doc, results):
    return {"rounds": len(results[0])}
'''


def test_multi_round_tasks_get_every_round_answered_in_turn(lmms_eval, task_dir, tmp_path):
    from lmms_eval.tasks import TaskManager

    (task_dir / "two_rounds.yaml").write_text(TWO_ROUNDS_YAML)
    (task_dir / "two_rounds.py").write_text(TWO_ROUNDS_PY)
    results = lmms_eval.evaluator.simple_evaluate(
        model="halluguard",
        model_args=f"pretrained=testbed,methods=vcd,config={STRONG_VCD}",
        tasks=["halluguard_test_two_rounds"],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=4,
        log_samples=True,
        verbosity="ERROR",
    )
    assert results["results"]["halluguard_test_two_rounds"]["rounds,none"] == 2
    samples = sorted(results["samples"]["halluguard_test_two_rounds"], key=lambda s: s["doc_id"])
    rounds = [s["resps"][0][0] for s in samples]  # one request per doc, its answers round by round
    ours, _ = through_halluguard_eval(tmp_path, "vcd", STRONG_VCD)
    assert rounds == [[answer, answer] for answer in ours]
