"""``halluguard demo``: the one-shot mode end to end on the shipped test model (text and JSON agree
with each other and with the scene's ground truth), clear errors, the attention picture, and the
interactive session driven through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pexpect
import pytest

from halluguard import testbed
from halluguard.cli import main
from halluguard.testbed import world

SCENE = ["--scene", "misleading:1", "--max-new-tokens", "40"]


def spawn_demo(*argv: str):
    """``halluguard demo`` in a pseudo-terminal, without colours."""
    env = dict(os.environ, NO_COLOR="1", COLUMNS="120", TERM="xterm")
    command = ["-m", "halluguard", "demo", *argv]
    return pexpect.spawn(sys.executable, command, env=env, encoding="utf-8", timeout=120, dimensions=(50, 120))


def run(capsys, *argv):
    code = main(["demo", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_shot_json_matches_the_scene_and_the_text_mode(capsys):
    code, out, _ = run(capsys, *SCENE, "--prompt", "", "--compare", "--json")
    assert code == 0
    result = json.loads(out)
    truth = set(world.sample_scene("misleading", 1).categories)
    assert set(result["ground_truth"]) == truth and result["methods"] == "vcd"
    plain, guarded = result["plain"], result["guarded"]
    for side in (plain, guarded):
        assert side["text"] and side["objects"]
        assert side["hallucinated"] == sorted(set(side["objects"]) - truth)
    assert result["only_plain"] == sorted(set(plain["objects"]) - set(guarded["objects"]))
    assert result["only_guarded"] == sorted(set(guarded["objects"]) - set(plain["objects"]))

    code, text, _ = run(capsys, *SCENE, "--prompt", "", "--compare")
    assert code == 0
    assert "plain" in text and "guarded: vcd" in text and "misleading scene 1" in text
    for side in ("plain", "guarded"):
        wrong = result[side]["hallucinated"]
        line = f"{side} hallucinates: {', '.join(wrong)}" if wrong else f"{side}: no hallucinated object"
        assert line in text


def test_one_shot_without_methods_answers_plainly(capsys):
    code, out, _ = run(capsys, *SCENE, "--prompt", "Is there a star in the image?", "--method", "none", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["guarded"] is None and result["plain"]["text"] in ("yes", "no")


def test_an_image_file_and_method_overrides(capsys, tmp_path):
    image = tmp_path / "scene.png"
    world.sample_scene("test", 3).render().save(image)
    config = '{"pai": {"alpha": 0.5}}'
    code, out, _ = run(capsys, "--image", str(image), "--prompt", "", "--method", "pai", "--config", config, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["picture"] == str(image) and result["ground_truth"] is None and result["guarded"]["text"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "/no/such/file.png", "--prompt", ""], "no image file at /no/such/file.png"),
        (["--scene", "nowhere:1", "--prompt", ""], "unknown scene split 'nowhere'"),
        (["--method", "nope", "--prompt", ""], "unknown method"),
        (["--set", "beams=0", "--prompt", ""], "num_beams must be at least 1"),
        (["--set", "colour=red", "--prompt", ""], "unknown setting 'colour'"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1


def test_unreadable_image_file(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, _, err = run(capsys, "--image", str(bad), "--prompt", "")
    assert code == 1 and f"cannot read {bad} as an image" in err


def test_attention_map_is_saved(capsys, tmp_path):
    target = tmp_path / "attention.png"
    code, _, _ = run(capsys, *SCENE, "--prompt", "", "--method", "none", "--save-attention", str(target))
    assert code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interactive_session_through_a_pseudo_terminal(tmp_path):
    child = spawn_demo("--max-new-tokens", "16")
    try:
        child.expect("picture: misleading scene 1")
        child.expect("> ")
        child.sendline("")  # a caption, plain and guarded
        child.expect("guarded: vcd")
        child.expect("hallucinated object|hallucinates")
        child.expect("> ")
        child.sendline(":method pai alpha=0.5")
        child.expect("methods: pai\\(alpha=0.5\\)")
        child.expect("> ")
        child.sendline(":frobnicate")
        child.expect("unknown command :frobnicate")
        child.expect("> ")
        child.sendline(f":image {tmp_path / 'missing.png'}")
        child.expect("no image file at")
        child.expect("> ")
        child.sendline(":scene test 2")
        child.expect("picture: test scene 2")
        child.expect("> ")
        child.sendline(":compare off")
        child.expect("compare: off")
        child.expect("> ")
        child.sendline("Is there a star in the image?")
        child.expect("guarded: pai")
        child.expect("> ")
        child.sendline(":quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_generation_and_keeps_the_session(tmp_path):
    # a copy of the test model with no end token in its generation config never stops on its own, so
    # the answer runs until interrupted, whatever the weights
    model = tmp_path / "model"
    shutil.copytree(testbed.path(), model)
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(dict(generation, eos_token_id=None)))
    picture = tmp_path / "scene.png"
    next(world.scenes("test", 1, seed=0)).render().save(picture)
    child = spawn_demo("--model", str(model), "--image", str(picture), "--method", "none", "--set", "max_tokens=3000")
    try:
        child.expect("> ")
        child.sendline("")
        child.expect("plain")  # the live table has started
        for _ in range(3):  # as a user would, press Ctrl-C again if the first one came too early
            child.sendintr()
            if child.expect(["stopped", pexpect.TIMEOUT], timeout=20) == 0:
                break
        else:
            pytest.fail("Ctrl-C did not stop the answer")
        child.expect("> ")
        child.sendline(":show")
        child.expect("methods: none")
        child.sendline(":quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_a_beam_search_method_decodes_with_its_own_beams(capsys):
    code, out, _ = run(capsys, *SCENE, "--prompt", "", "--method", "opera", "--json")
    assert code == 0, "OPERA needs its beams: the demo must not force one"
    assert json.loads(out)["guarded"]["text"]


def piped(*lines: str, argv=("--max-new-tokens", "6")):
    """``halluguard demo`` with ``lines`` piped in, as a script would: (exit status, output)."""
    import subprocess

    env = dict(os.environ, NO_COLOR="1", COLUMNS="120")
    done = subprocess.run(
        [sys.executable, "-m", "halluguard", "demo", *argv],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def test_piped_lines_are_answered_one_by_one_as_typed():
    code, out = piped("Is there a star in the image?", ":method none", "Is there a moon in the image?", ":show", "quit")
    assert code == 0
    assert out.count("plain") >= 2 and "guarded: vcd" in out  # the first question compared, the second plain
    assert "methods: none (plain decoding only)" in out
    answers = [line.strip("│ ").strip() for line in out.splitlines() if line.startswith("│")]
    assert answers and all(a.split()[0] in ("yes", "no") for a in answers if a)  # questions, not captions


def test_a_failed_line_keeps_the_session_and_makes_a_piped_run_fail(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    code, out = piped(
        ":attention att.txt",
        f":attention {folder}",
        ":scene misleading -1",
        ":method opera",
        ":set beams=1",
        ":set sample=on",
        "help",
        ":show",
    )
    assert code == 1  # every line ran; one failed
    assert ":attention att.txt: a picture file ends in one of" in out and ".png" in out
    assert f":attention {folder} is a folder; give a file name" in out
    assert "a scene index is 0 or more" in out
    assert "methods: opera" in out
    assert "opera: a beam search, it does not run with num_beams=1" in out  # refused when set, not later
    assert "opera: a beam search, it refuses sampling" in out
    assert ":quit" in out  # help, typed alone
    assert "greedy, up to 6 tokens" in out  # :show: the refused settings were not kept
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "maps.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "x.png", "--scene", "test:1"], "--image and --scene both name the picture; give one"),
        (["--max-new-tokens", "8", "--set", "max_tokens=16"], "--max-new-tokens and --set max_tokens=... both set"),
        (["--method", "opera", "--set", "beams=1"], "opera: a beam search, it does not run with num_beams=1"),
        (["--method", "opera", "--set", "sample=on"], "opera: a beam search, it refuses sampling"),
        (["--method", "opera+pai"], "cannot compose 'opera' with 'pai'"),
        (["--save-attention", "map.txt"], "--save-attention map.txt: a picture file ends in one of"),
    ],
)
def test_impossible_settings_are_refused_before_the_model_loads(capsys, monkeypatch, argv, message):
    from halluguard.demo import app

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the settings were checked")

    monkeypatch.setattr(app, "load_model", no_loading)
    code, _, err = run(capsys, *argv, "--prompt", "")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_while_the_demo_loads_says_interrupted(capsys, monkeypatch):
    from halluguard.demo import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "load_model", interrupted)
    assert main(["demo", "--prompt", ""]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "halluguard: interrupted"


def test_bare_words_in_the_terminal_session():
    child = spawn_demo("--max-new-tokens", "4")
    try:
        child.expect("> ")
        child.sendline("help")
        child.expect(":attention FILE.png")
        child.expect("> ")
        child.sendline(":attention att.txt")
        child.expect("a picture file ends in one of")
        child.expect("> ")  # the session goes on
        child.sendline("q")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
