"""Presets of the official runs (``eval chair|pope --preset``): a preset fills what the command line
leaves unset, options given beside it win and are recorded, a method's fields merge one by one, the
prompt is the script's own on a LLaVA-1.5 processor and the family's chat template with the system
turn elsewhere, and a preset without a script for the task is refused."""

import json
import shlex
from pathlib import Path

import pytest

from halluguard import cli
from halluguard.eval import presets
from halluguard.eval.runner import Decoding, RunSettings, row_prompt
from halluguard.models import load_model


def run(argv: str) -> int:
    return cli.main(shlex.split(argv))


def results(folder) -> dict:
    return json.loads((Path(folder) / "results.json").read_text())


def test_a_preset_fills_what_is_not_given_and_records_what_is():
    given = {"max_new_tokens": 3, "do_sample": None, "config": {"vcd": {"beta": 0.1, "noise_step": 999}}}
    options, record = presets.resolve("vcd", "pope", given)
    assert options["do_sample"] is True and options["prompt_suffix"] == " Please answer this question with one word."
    assert options["answer_rule"] == "vcd" and options["system_prompt"] == presets.CURIOUS_HUMAN
    assert "max_new_tokens" not in options  # given: the command line's value stays
    assert options["config"] == {"vcd": {"alpha": 1.0, "beta": 0.1, "noise_step": 999}}  # field by field
    assert record["overridden"] == {
        "max_new_tokens": {"preset": 1024, "given": 3},
        "config.beta": {"preset": 0.2, "given": 0.1},
        "config.noise_step": {"preset": 500, "given": 999},
    }
    assert record["script"].startswith("experiments/cd_scripts/llava1.5_pope.bash")
    assert record["set"]["max_new_tokens"] == 1024


def test_another_method_under_a_preset_keeps_the_prompt_and_decoding_but_not_the_fields():
    options, record = presets.resolve("vcd", "pope", {"method": ""})
    assert "config" not in options and "method" not in options
    assert record["overridden"]["method"] == {"preset": "vcd", "given": ""}
    assert options["do_sample"] is True and options["system_prompt"] == presets.CURIOUS_HUMAN


@pytest.mark.parametrize(
    "name, task, message",
    [
        ("vcd", "chair", "DAMO-NLP-SG/VCD has POPE scripts only, no CHAIR one"),
        ("avisc", "chair", "sangminwoo/AvisC has POPE scripts only"),
        ("decore", "pope", "evaluates text QA and summarisation only"),
        ("nope", "pope", "unknown preset 'nope'"),
    ],
)
def test_a_preset_without_a_script_for_the_task_is_refused(name, task, message):
    with pytest.raises(ValueError, match=message):
        presets.resolve(name, task, {})


def test_every_preset_names_a_method_that_exists_with_fields_it_has():
    from halluguard.registry import get_config

    for preset in presets.PRESETS.values():
        get_config(preset.method, **preset.config)  # raises on an unknown field
        assert preset.refusal or preset.runs


def test_the_scripts_layout_applies_to_a_llava_processor_only(checkpoint):
    settings = RunSettings(Decoding(8), system_prompt="SYS.", llava_layout=presets.JOINED_LAYOUT)
    _, llava, _ = load_model(checkpoint("llava"))
    assert row_prompt(llava, "Is there a cat?", settings) == "SYS.USER: <image> Is there a cat? ASSISTANT:"
    _, qwen, _ = load_model(checkpoint("qwen2_vl"))
    prompt = row_prompt(qwen, "Is there a cat?", settings)
    assert prompt.startswith("<|im_start|>system\nSYS.<|im_end|>\n<|im_start|>user\n")  # its own template
    plain = RunSettings(Decoding(8), system_prompt="SYS.")
    assert row_prompt(llava, "Is there a cat?", plain) == "SYS. USER: <image>\nIs there a cat? ASSISTANT:"


def test_eval_with_a_preset_records_it_and_runs_its_settings(tmp_path):
    out = tmp_path / "vcd"
    assert run(f"eval pope --preset vcd --num-images 2 --out {out}") == 0
    found = results(out)
    assert found["preset"]["name"] == "vcd" and found["preset"]["overridden"] == {}
    assert found["preset"]["adjusted"]["max_new_tokens"] == {
        "preset": 1024,
        "used": 10,
        "why": "the test model's context",
    }
    assert found["decoding"] == {
        "max_new_tokens": 10,
        "num_beams": 1,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    assert found["prompt_template"] == presets.CURIOUS_HUMAN + " USER: <image>\n{text} ASSISTANT:"
    assert found["answer_rule"] == "vcd" and found["prompt_suffix"] == " Please answer this question with one word."
    assert found["methods"][0]["beta"] == 0.2
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 36  # 2 scenes x 6 questions x 3 splits


def test_options_beside_a_preset_win_and_greedy_drops_its_sampling(tmp_path, capsys):
    out = tmp_path / "run"
    argv = f"eval pope --preset vcd --num-images 2 --out {out} --no-do-sample --max-new-tokens 3"
    assert run(argv + " --config '{\"beta\": 0.3}'") == 0
    found = results(out)
    assert found["decoding"] == {
        "max_new_tokens": 3,
        "num_beams": 1,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    assert found["preset"]["overridden"] == {
        "max_new_tokens": {"preset": 1024, "given": 3},
        "do_sample": {"preset": True, "given": False},
        "config.beta": {"preset": 0.2, "given": 0.3},
    }
    assert found["methods"][0]["beta"] == 0.3
    assert run(f"eval pope --preset vcd --num-images 2 --no-do-sample --temperature 0.5 --out {tmp_path}/x") == 2
    assert "--temperature applies only with --do-sample" in capsys.readouterr().err


def test_the_official_baseline_is_a_preset_without_its_method(tmp_path):
    assert run(f"eval chair --preset pai --method '' --num-images 2 --max-new-tokens 4 --out {tmp_path}/b") == 0
    found = results(tmp_path / "b")
    assert found["methods"] == [] and found["decoding"]["num_beams"] == 1 and not found["decoding"]["do_sample"]
    assert found["prompt_template"] == presets.CURIOUS_USER + "USER: <image> {text} ASSISTANT:"
    assert found["prompt"] == "Please help me describe the image in detail."


def test_a_preset_gets_its_own_run_folder_and_refusals_are_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("eval pope --preset pai --num-images 1 --splits random") == 0
    assert (tmp_path / "runs" / "pope-testbed-testbed-pai-preset_pai" / "results.json").is_file()
    assert run("eval pope --num-images 1 --splits random --method pai") == 0  # not the preset's folder: no clash
    assert (tmp_path / "runs" / "pope-testbed-testbed-pai" / "results.json").is_file()
    assert run("eval chair --preset vcd --num-images 1") == 2
    assert "--preset vcd: DAMO-NLP-SG/VCD has POPE scripts only, no CHAIR one" in capsys.readouterr().err
    assert run("eval chair --preset decore --num-images 1") == 2
    assert "DeCoRe's repository evaluates text QA" in capsys.readouterr().err


def test_a_preset_on_a_checkpoint_uses_its_layout_and_its_limits(checkpoint, tmp_path):
    folder = checkpoint("llava")
    pope = f"eval pope --model {folder} --dataset testbed --num-images 1 --splits random --batch-size 2"
    assert run(f"{pope} --preset pai --max-new-tokens 4 --out {tmp_path}/pai") == 0
    found = results(tmp_path / "pai")
    assert found["prompt_template"] == presets.CURIOUS_USER + "USER: <image> {text} ASSISTANT:"
    assert found["methods"][0]["gamma"] == 1.1 and found["methods"][0]["use_cfg"] is True
    assert "adjusted" not in found["preset"]
