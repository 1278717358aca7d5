"""The console script: every user mistake gives one line and a non-zero exit, ``--help`` is quick
and shows the defaults, ``methods -v`` names only commands that exist."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from halluguard import cli


def outcome(argv, capsys):
    """(exit status, stderr) of ``halluguard argv`` run in this process."""
    try:
        status = cli.main(argv)
    except SystemExit as exit:  # argparse
        status = exit.code
    return status, capsys.readouterr().err


@pytest.fixture
def coco_dir(tmp_path):
    (tmp_path / "coco").mkdir()
    return str(tmp_path / "coco")


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["eval", "chair", "--num-images", "1", "--max-new-tokens", "2", "--out", str(out)]) == 0
    return str(out)


HEADS = "calibrate retrieval-heads --model testbed --out {tmp}/h.json"

# (case, argv, message): {coco}, {tmp} and {run} are filled in per test.
BAD_INPUTS = [
    ("zero images", "eval chair --num-images 0", "argument --num-images: must be at least 1, got 0"),
    ("controls without a contrast", "eval chair --method vhr --controls", "--controls needs exactly one method"),
    (
        "controls of PAI without guidance",
        "eval pope --method pai --config '{{\"use_cfg\": false}}' --controls",
        "--controls needs exactly one method",
    ),
    ("chart without controls", "eval chair --method vcd --chart {tmp}/c.png", "--chart applies with --controls"),
    ("zero questions", "eval pope --num-questions 0", "argument --num-questions: must be at least 1"),
    ("zero tokens", "eval chair --max-new-tokens 0", "argument --max-new-tokens: must be at least 1"),
    ("negative batch", "eval pope --batch-size -2", "argument --batch-size: must be at least 1"),
    ("zero beams", "eval chair --num-beams 0", "argument --num-beams: must be at least 1"),
    ("count not a number", "eval chair --num-images ten", "expected a whole number, got 'ten'"),
    ("seed not a number", "eval chair --seed x", "argument --seed: invalid int value"),
    ("unknown POPE split", "eval pope --splits random typo", "--splits: invalid choice: 'typo'"),
    ("unknown testbed split", "eval chair --split train", "--split: invalid choice: 'train'"),
    ("unknown dataset", "eval chair --dataset aokvqa", "--dataset: invalid choice: 'aokvqa'"),
    ("split named twice", "eval pope --splits random random", "a POPE split is named twice"),
    ("unknown answer rule", "eval pope --answer-rule llava", "invalid choice: 'llava'"),
    ("unknown dtype", "eval chair --dtype fp8", "invalid choice: 'fp8'"),
    (
        "--coco-images with the testbed",
        "eval chair --coco-images {coco}",
        "--coco-images does not apply to the testbed",
    ),
    ("--image-ids with the testbed", "eval chair --image-ids seeded", "--image-ids does not apply to the testbed"),
    ("COCO without images", "eval chair --dataset coco", "the coco dataset needs --coco-images DIR"),
    ("POPE gqa without images", "eval pope --dataset gqa", "the gqa dataset needs --coco-images DIR"),
    ("missing image folder", "eval pope --dataset coco --coco-images {tmp}/nope", "--coco-images {tmp}/nope: no such"),
    (
        "--split with COCO",
        "eval chair --dataset coco --coco-images {coco} --split test",
        "--split applies to the testbed",
    ),
    ("--num-images with COCO POPE", "eval pope --dataset coco --coco-images {coco} --num-images 5", "--num-images app"),
    ("missing id file", "eval chair --dataset coco --coco-images {coco} --image-ids {tmp}/ids.txt", "neither 'opera'"),
    ("temperature without sampling", "eval chair --temperature 0.7", "--temperature applies only with --do-sample"),
    ("top-p without sampling", "eval pope --top-p 0.9", "--top-p applies only with --do-sample"),
    ("zero temperature", "eval chair --do-sample --temperature 0", "must be a finite number above 0, got 0"),
    ("infinite temperature", "eval chair --do-sample --temperature inf", "must be a finite number above 0"),
    ("top-p above 1", "eval chair --do-sample --top-p 1.5", "argument --top-p: must be in (0, 1], got 1.5"),
    ("--config without --method", "eval chair --config {{}}", "--config needs --method"),
    ("--config not JSON", "eval chair --method pai --config {{alpha:", "--config: the text is not valid JSON"),
    ("--config not an object", "eval chair --method pai --config [1]", "--config must be a JSON object of fields"),
    ("--config unknown field", """eval chair --method pai --config '{{"alpah":1}}'""", "--config: "),
    ("--config out of range", """eval chair --method pai --config '{{"alpha":-1}}'""", "--config: "),
    ("--config for 2 methods", """eval chair --method pai+vhr --config '{{"alpha":1}}'""", "must map each method"),
    ("unknown method", "eval chair --method nosuch", "unknown method 'nosuch'"),
    ("OPERA with one beam", "eval chair --method opera --num-beams 1", "opera: a beam search, it does not run with"),
    ("OPERA sampling", "eval chair --method opera --do-sample", "opera: a beam search, it refuses sampling"),
    ("guided without a classifier", """eval chair --method lookback --config '{{"mode":"guide"}}'""", "needs a class"),
    ("Lookback and beams", "eval pope --method lookback --num-beams 2", "lookback: cannot follow beam search"),
    ("two loop owners", "eval chair --method opera+lookback", "cannot compose"),
    ("empty prompt", "eval chair --prompt ''", "the CHAIR prompt is empty"),
    ("missing model path", "eval chair --model {tmp}/no/model", "model path {tmp}/no/model does not exist"),
    ("device without CUDA", "eval chair --device cuda:0", "CUDA is not available here"),
    ("unknown device", "eval chair --device gpu7", "unknown device 'gpu7'"),
    ("--out is a file", "eval chair --num-images 1 --out {tmp}/file", "is a file"),
    ("--out under a file", "eval chair --num-images 1 --out {tmp}/file/run", "cannot write the run folder"),
    ("settings differ from the run", "eval chair --num-images 1 --out {run}", "other settings (decoding.max_new_"),
    ("report of a missing folder", "eval report {tmp}/nope", "{tmp}/nope: no such run folder"),
    ("report of an unfinished run", "eval report {tmp}", "no results.json"),
    ("report of a bad results file", "eval report {tmp}/file", "not a results file"),
    ("report without runs", "eval report", "the following arguments are required: runs"),
    ("report chart not a picture", "eval report {tmp} --chart {tmp}/c.txt", "--chart {tmp}/c.txt: a picture file"),
    ("unknown command", "evaluate", "invalid choice: 'evaluate'"),
    ("no command", "", "the following arguments are required: command"),
    ("methods: unknown name", "methods nosuch", "unknown method 'nosuch'"),
    ("sink-dims: missing model", "calibrate sink-dims --model {tmp}/none", "model path {tmp}/none does not exist"),
    ("sink-dims: --out a folder", "calibrate sink-dims --model {tmp}/none --out {tmp}", "--out {tmp} is a folder"),
    ("sink-dims: negative tau", "calibrate sink-dims --model testbed --tau -1", "argument --tau: must be a finite"),
    ("lookback: --out a folder", "calibrate lookback --model {tmp}/none --out {tmp}", "--out {tmp} is a folder"),
    (
        "lookback: another model without images",
        "calibrate lookback --model {tmp}/none --out {tmp}/lb.json",
        "a model other than the test model needs --coco-images DIR",
    ),
    (
        "lookback: images without annotations",
        "calibrate lookback --model {tmp}/none --coco-images {coco} --out {tmp}/lb.json",
        "--coco-images needs --annotations DIR",
    ),
    ("retrieval-heads: no --out", "calibrate retrieval-heads --model testbed", "required: --out"),
    ("retrieval-heads: zero trials", f"{HEADS} --trials 0", "argument --trials: must be at least 1, got 0"),
    ("retrieval-heads: zero haystack", f"{HEADS} --haystack-length 0", "argument --haystack-length: must be at"),
    ("retrieval-heads: negative needle", f"{HEADS} --needle-length -3", "argument --needle-length: must be at"),
    ("retrieval-heads: seed not a number", f"{HEADS} --seed x", "argument --seed: invalid int value"),
    ("retrieval-heads: accuracy 1", f"{HEADS} --min-copy-accuracy 1", "--min-copy-accuracy: must be in [0, 1), got 1"),
    ("retrieval-heads: accuracy < 0", f"{HEADS} --min-copy-accuracy -0.1", "--min-copy-accuracy: must be in [0, 1)"),
    ("retrieval-heads: --out a folder", "calibrate retrieval-heads --model testbed --out {tmp}", "is a folder"),
    (
        "retrieval-heads: --out in a missing folder",
        "calibrate retrieval-heads --model testbed --out {tmp}/no/h.json",
        "the folder {tmp}/no does not exist",
    ),
    (
        "retrieval-heads: missing model",
        "calibrate retrieval-heads --model {tmp}/none --out {tmp}/h.json",
        "model path {tmp}/none does not exist",
    ),
]


@pytest.mark.parametrize("case, argv, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_a_mistake_gives_one_line_and_a_nonzero_exit(request, tmp_path, capsys, coco_dir, case, argv, message):
    (tmp_path / "file").write_text("not a run\n")
    fill = {"coco": coco_dir, "tmp": str(tmp_path)}
    if "{run}" in argv:
        fill["run"] = request.getfixturevalue("finished_run")
        capsys.readouterr()
    import shlex

    status, err = outcome(shlex.split(argv.format(**fill)), capsys)
    assert status not in (0, None), case
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Loading weights", "CHAIR"))]
    assert len(lines) == 1, err
    assert message.format(**fill) in lines[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown device"):
        cli.main(["eval", "chair", "--device", "gpu7", "--debug"])
    with pytest.raises(cli.UsageError, match="--config needs --method"):
        cli.main(["--debug", "eval", "chair", "--config", "{}"])


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "chair", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in (
        "--num-images NUM_IMAGES images to caption (default: 500)",
        "(default: 512 on COCO, 64 with --short or on the testbed)",
        "samples per generate call (default: 8)",
        "caption prompt (default: Please describe this image in detail.)",
        "(default: 0)",
        "(default: testbed)",
        "(default: misleading)",
        "(default: opera)",
    ):
        assert default in text, default
    with pytest.raises(SystemExit):
        cli.main(["eval", "pope", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "token limit per answer (default: 10)" in text and "(default: all)" in text and "(default: pope)" in text


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from halluguard import cli\n"
        "for argv in (['--help'], ['eval', 'chair', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: cli.main(argv)\n"
        "        except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_methods_verbose_names_only_commands_that_exist(capsys):
    assert cli.main(["methods", "-v"]) == 0
    text = capsys.readouterr().out
    mentioned = re.findall(r"`halluguard ([a-z -]+?)(?: --[^`]*)?`( \(not shipped yet\))?", text)
    assert mentioned, "the method docs name no command (nothing to check)"
    for command, marked in mentioned:
        assert cli._command_exists(command.split()) != bool(marked), command


def test_methods_verbose_shows_what_each_method_can_do_as_registered(capsys):
    from halluguard import registry

    for name in registry.list_methods(available_only=True):
        assert cli.main(["methods", name]) == 0
        text = capsys.readouterr().out
        for line in registry.entry(name).capabilities_for().describe():
            assert cli.mark_missing_commands(line) in text, (name, line)


def test_mark_missing_commands():
    assert cli.mark_missing_commands("run `halluguard calibrate sink-dims --model x`") == (
        "run `halluguard calibrate sink-dims --model x`"
    )
    assert (
        cli.mark_missing_commands("`halluguard calibrate nothing`")
        == "`halluguard calibrate nothing` (not shipped yet)"
    )
    assert cli.mark_missing_commands("`halluguard eval pope`") == "`halluguard eval pope`"


def test_a_run_with_failed_rows_exits_nonzero_and_says_why(tmp_path, capsys):
    from halluguard.eval import pope

    image = pope.load_questions("coco", "random")[0]["image"]
    (tmp_path / "coco").mkdir()
    from halluguard.testbed import world

    next(world.scenes("test", 1, 0)).render().save(tmp_path / "coco" / image)
    argv = ["eval", "pope", "--dataset", "coco", "--coco-images", str(tmp_path / "coco"), "--splits", "random"]
    argv += ["--num-questions", "7", "--max-new-tokens", "2", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "| random |" in captured.out
    assert (
        "1 of 7 rows failed (random/7: FileNotFoundError" in captured.err and "rerun the same command" in captured.err
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["failed"]["count"] == 1 and results["complete"] is False


def test_console_script_runs_from_elsewhere(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "halluguard", "eval", "pope", "--num-images", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "must be at least 1" in done.stderr


def test_an_interrupted_run_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from halluguard.eval import runner

    produce, calls = runner._produce, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return produce(*args, **kwargs)

    monkeypatch.setattr(runner, "_produce", interrupted)
    argv = ["eval", "chair", "--num-images", "3", "--batch-size", "2", "--max-new-tokens", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "halluguard: interrupted; rerun the same command to resume"
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2  # the first batch is kept
    monkeypatch.setattr(runner, "_produce", produce)
    assert cli.main(argv) == 0 and len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3


def test_config_json_longer_than_a_file_name_is_read_as_json():
    from halluguard.cli import method_configs

    heads = {f"{layer}-{head}": [1.0 / (1 + layer + head)] for layer in range(12) for head in range(12)}
    text = json.dumps({"decore": {"retrieval_heads": heads, "num_retrieval_heads": 5}})
    assert len(text) > 300
    (config,) = method_configs("decore", text)
    assert config.num_retrieval_heads == 5 and config.retrieval_heads == heads


def test_sink_dims_of_a_model_without_sinks_saves_nothing(tmp_path, capsys):
    target = tmp_path / "dims.json"
    assert cli.main(["calibrate", "sink-dims", "--model", "testbed", "--out", str(target)]) == 1
    out = capsys.readouterr().out
    assert "no massive-activation dimensions" in out and "saved" not in out
    assert not target.exists()


@pytest.mark.parametrize("tool", ["sink-dims", "retrieval-heads", "lookback"])
def test_ctrl_c_during_calibration_says_interrupted(tool, tmp_path, capsys, monkeypatch):
    from halluguard import models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    assert cli.main(["calibrate", tool, "--model", "testbed", "--out", str(tmp_path / "out.json")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "halluguard: interrupted"


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "chair", "--method", "opera", "--num-beams", "1"],
        ["eval", "chair", "--method", "lookback", "--config", '{"mode": "guide"}'],
        ["eval", "pope", "--method", "lookback", "--num-beams", "2"],
    ],
)
def test_a_method_and_decoding_that_cannot_run_are_refused_before_the_model_loads(argv, capsys, monkeypatch):
    from halluguard import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the method and decoding were checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    assert cli.main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _swallowed_ctrl_c():
    """A Ctrl-C that lands where Python swallows it (as in a finalizer, or numpy's list conversion)."""
    import os
    import signal

    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs at the next bytecode
            pass
    except KeyboardInterrupt:
        pass


def test_a_ctrl_c_that_something_swallowed_still_ends_the_command_as_interrupted(monkeypatch, capsys):
    def swallows(args):
        _swallowed_ctrl_c()
        return 0

    monkeypatch.setattr(cli, "_cmd_doctor", swallows)
    assert cli.main(["doctor"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "halluguard: interrupted"

    def import_stopped(args):  # an interrupt in a C extension's initialisation becomes an ImportError
        _swallowed_ctrl_c()
        raise ImportError("initialization failed")

    monkeypatch.setattr(cli, "_cmd_doctor", import_stopped)
    assert cli.main(["doctor"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "halluguard: interrupted"


def test_an_eval_stops_before_the_next_batch_after_a_swallowed_ctrl_c(tmp_path, capsys, monkeypatch):
    from halluguard.eval import runner

    produce, calls = runner._produce, []

    def swallows_in_the_first_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            _swallowed_ctrl_c()
        return produce(*args, **kwargs)

    monkeypatch.setattr(runner, "_produce", swallows_in_the_first_batch)
    argv = ["eval", "chair", "--num-images", "6", "--batch-size", "2", "--max-new-tokens", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 130
    assert len(calls) == 1  # the second batch never started
    assert capsys.readouterr().err.splitlines()[-1] == "halluguard: interrupted; rerun the same command to resume"


def test_controls_run_plain_the_method_and_its_control_side_by_side(tmp_path, capsys):
    out, chart = tmp_path / "run", tmp_path / "c.png"
    argv = ["eval", "chair", "--num-images", "2", "--max-new-tokens", "4", "--method", "vcd", "--controls"]
    assert cli.main([*argv, "--out", str(out), "--chart", str(chart)]) == 0
    table = capsys.readouterr().out
    for folder in (f"{out}-plain", str(out), f"{out}-control"):
        assert json.loads((Path(folder) / "results.json").read_text())["samples"] == 2
        assert f"results: {folder}/results.json" in table
    rows = [line for line in table.splitlines() if line.startswith("| testbed")]
    assert [row.split(" | ")[2] for row in rows] == ["vanilla", "vcd", "vcd(control=True)"]
    assert chart.stat().st_size > 0
    assert cli.main([*argv, "--out", str(out)]) == 0  # a rerun resumes all three
