"""``halluguard bench``: the table, JSON and chart it writes (structure only: timings are not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from halluguard.cli import main


@pytest.fixture(autouse=True)
def steady_clock(monkeypatch):
    """Timings are not what these tests check: every run reports 10 ms per token it generates, so a
    busy machine cannot make a longer run look faster than the prompt's (which the bench refuses)."""
    from halluguard import bench

    run = bench._run

    def steady(model, inputs, new_tokens, counter, memory=False, generate=bench._plain):
        _, calls, peak = run(model, inputs, new_tokens, counter, memory, generate)
        return 0.01 * new_tokens, calls, peak

    monkeypatch.setattr(bench, "_run", steady)


def test_bench_writes_rows_for_plain_and_each_method(tmp_path, capsys):
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--methods", "vhr", "pai", "var", "--new-tokens", "2", "--repeats", "1"]
    assert main([*argv, "--json", str(out), "--chart", str(picture)]) == 0
    printed = capsys.readouterr().out
    assert "var: skipped: VAR needs the massive-activation" in printed  # the test model has no sink table
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["plain", "vhr", "pai"]
    for row in rows:
        assert row["prompt_s"] > 0 and row["tokens_per_s"] > 0
        assert row["forwards_per_token"] == 1.0  # VHR's probe and PAI's guidance ride in the same forwards
    assert "| vhr |" in printed and "| pai |" in printed
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_bench_refuses_an_unknown_method_before_loading(capsys):
    assert main(["bench", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_bench_adds_the_official_way_rows_and_restores_the_attention(tmp_path, monkeypatch):
    from halluguard import bench

    loaded = {}
    load = bench.load

    def keep(*args, **kwargs):
        model, *rest = load(*args, **kwargs)
        loaded["model"] = model
        return (model, *rest)

    monkeypatch.setattr(bench, "load", keep)
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--methods",
        "vhr",
        "lookback",
        "avc",
        "opera",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--official",
    ]
    assert main([*argv, "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "vhr", "lookback", "avc", "opera", "plain, 5 beams", *bench.OFFICIAL]
    forwards = [rows[name]["forwards_per_token"] for name in bench.OFFICIAL]
    assert forwards == [1.0, 2.0, 1.0]  # maps; maps and a second sequential forward; beams in one forward
    # only the official rows of the methods benched
    assert main(["bench", "--methods", "vhr", "avc", "--new-tokens", "2", "--repeats", "1", "--official",
                 "--json", str(out)]) == 0  # fmt: skip
    assert [r["method"] for r in json.loads(out.read_text())["rows"]][-1] == "official way: maps + 2nd forward (AvisC)"
    assert len(json.loads(out.read_text())["rows"]) == 4
    text = loaded["model"].config.get_text_config(decoder=True)
    assert text._attn_implementation == "sdpa"


def _no_model(monkeypatch):
    from halluguard import bench

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(bench, "load", no_loading)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--json", "/no/such/folder/x.json"],
            "--json /no/such/folder/x.json: the folder /no/such/folder does not exist",
        ),
        (["--chart", "c.txt"], "--chart c.txt: a picture file ends in one of"),
        (["--config", "{bad"], "--config is not valid JSON"),
        (["--config", '{"alpha": 1}'], "--config maps each method to its fields"),
        (["--config", '{"vcd": {"alpha": 0.5}}'], "--config sets vcd, which --methods does not bench"),
        (["--config", '{"pai": {"alpha": -1}}'], "--config pai:"),
    ],
)
def test_bench_refuses_bad_arguments_before_loading(capsys, monkeypatch, argv, message):
    _no_model(monkeypatch)
    assert main(["bench", "--methods", "pai", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_with_no_method_that_runs_says_why(capsys):
    assert main(["bench", "--methods", "var", "--new-tokens", "2", "--repeats", "1"]) == 1
    err = capsys.readouterr().err
    assert "no method could run on this model (var: VAR needs the massive-activation" in err


def test_bench_never_prints_an_impossible_time(capsys, monkeypatch):
    """A repeat whose full run is not slower than its prompt run is measured again; when it never is,
    the run stops with a reason instead of a negative time or ratio."""
    from halluguard import bench

    run, slow_prompts = bench._run, {"left": 2}

    def stalled_prompt(model, inputs, new_tokens, counter, memory=False, generate=bench._plain):
        seconds, calls, peak = run(model, inputs, new_tokens, counter, memory, generate)
        if new_tokens == 1 and slow_prompts["left"] > 0:  # a prompt run the machine stalled
            slow_prompts["left"] -= 1
            return seconds + 60.0, calls, peak
        return seconds, calls, peak

    monkeypatch.setattr(bench, "_run", stalled_prompt)
    argv = ["bench", "--methods", "vhr", "--new-tokens", "2", "--repeats", "1"]
    assert main(argv) == 0  # the two stalled repeats were measured again
    table = capsys.readouterr().out
    assert "-" not in "".join(line.split("|")[4] for line in table.splitlines() if line.startswith("| vhr"))
    slow_prompts["left"] = 10**6  # every prompt run stalls
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "the decode time could not be measured: in 3 tries" in err and "| vhr |" not in out


def test_ctrl_c_during_a_bench_says_interrupted(capsys, monkeypatch):
    from halluguard import bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "measure", interrupted)
    assert main(["bench", "--methods", "vhr", "--new-tokens", "2", "--repeats", "1"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "halluguard: interrupted"


def test_the_operation_counter_counts_each_aten_operation_once():
    from halluguard.bench.ops import count, step_counts

    counts = count(lambda: (torch.ones(3) + 1).mul(2).sum())
    assert counts.aten == 4 and counts.launches == 0  # ones, add, mul, sum; no Triton kernel
    grown = []
    steps = step_counts(lambda n: [torch.zeros(2) for _ in range(10 + 3 * n)] and grown.append(n), 4)
    assert grown == [1, 5] and steps.prompt.aten == 13 and steps.aten_per_token == 3.0
    with pytest.raises(ValueError, match="at least one decoded token"):
        step_counts(lambda n: None, 0)


def test_bench_ops_counts_plain_and_each_method_in_the_same_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--methods", "vcd", "vhr", "--new-tokens", "2", "--repeats", "1", "--ops", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    plain, vcd, vhr = rows["plain"], rows["vcd"], rows["vhr"]
    assert plain["extra_ops_per_layer_step"] == 0 and plain["ops_per_token"] > 0 and plain["prompt_ops"] > 0
    # VCD's branch rows add operations at every layer of every step; VHR acts in the prompt's forward
    assert vcd["ops_per_token"] > plain["ops_per_token"] and vcd["extra_ops_per_layer_step"] > 0
    assert vhr["prompt_ops"] > plain["prompt_ops"]
    layers = 6  # the test model's text layers
    assert vcd["extra_ops_per_layer_step"] == (vcd["ops_per_token"] - plain["ops_per_token"]) / layers
    assert all(r["launches_per_token"] == 0 for r in rows.values())  # the reference path on CPU
    assert "| method | aten ops, prompt phase |" in printed and "| vcd |" in printed


def test_synthetic_7b_has_llava_1_5_7b_shapes_and_is_made_where_it_runs():
    from halluguard.bench import synthetic

    model = synthetic.build("synthetic-7b", device="meta")  # the shapes without the 14 GB of weights
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072  # llava-1.5-7b-hf's count
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == (
        32, 4096, 32, 11008,
    )  # fmt: skip
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (24, 1024, 336, 14)
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "meta")}
    batch = synthetic.inputs(2, name="synthetic-7b")
    assert batch["input_ids"].shape == (2, 1 + 20 + 576 + 30)
    assert (batch["input_ids"] == model.config.image_token_index).sum(1).tolist() == [576, 576]
    assert batch["pixel_values"].shape == (2, 3, 336, 336)
    with pytest.raises(ValueError, match="choose from synthetic-medium, synthetic-7b"):
        synthetic.build("synthetic-70b")


@pytest.mark.slow
def test_bench_runs_the_calibrated_methods_on_a_synthetic_model_with_stand_ins(tmp_path, capsys, monkeypatch):
    """VAR, DeCoRe, VTI and ICD need a model's calibration data, which a random model has none of: the
    bench gives them timing-only stand-ins, which ``--config`` adds to field by field (DeCoRe keeps the
    stand-in heads and takes the number of heads given)."""
    from halluguard import bench

    measure, seen = bench.measure, {}

    def keep_overrides(model, processor, inputs, specs, new_tokens, repeats, overrides, **kwargs):
        seen.update(overrides)
        return measure(model, processor, inputs, specs, new_tokens, repeats, overrides, **kwargs)

    monkeypatch.setattr(bench, "measure", keep_overrides)
    out = tmp_path / "bench.json"
    config = json.dumps({"decore": {"num_retrieval_heads": 3}})
    argv = ["bench", "--model", "synthetic-medium", "--methods", "var", "decore", "vti", "icd", "--config", config]
    assert main([*argv, "--new-tokens", "1", "--repeats", "1", "--threads", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    # VTI decodes as its official runs do, with 5 beams: it is read against plain beam search too
    assert [r["method"] for r in data["rows"]] == ["plain", "var", "decore", "vti", "icd", "plain, 5 beams"]
    assert data["setting"].startswith("synthetic-medium (random LLaVA-1.5 shape, 146M, float32), batch 1")
    assert "skipped" not in capsys.readouterr().out
    assert seen["decore"]["num_retrieval_heads"] == 3 and len(seen["decore"]["retrieval_heads"]) == 12 * 12
    assert not Path(seen["vti"]["directions"]).exists()  # the stand-in file went with the run


def test_stand_ins_fit_the_model_and_yield_to_what_is_given(tmp_path):
    from halluguard.bench import synthetic
    from halluguard.methods.vti.method import load_directions

    assert synthetic.stand_ins("synthetic-7b", {"vhr", "pai"}, tmp_path) == {}
    fields = synthetic.stand_ins("synthetic-7b", {"decore", "vti"}, tmp_path)
    heads = fields["decore"]["retrieval_heads"]
    assert len(heads) == 32 * 32 and "31-31" in heads  # every (layer, head) of the 7B text model
    directions = load_directions(fields["vti"]["directions"])
    assert directions.text.shape == (32, 4096) and directions.vision.shape == (24, 577, 1024)  # CLS + 576
    given = {"vti": {"directions": "mine.safetensors"}, "var": {"tau": 2.0}}
    fields = synthetic.stand_ins("synthetic-medium", {"vti", "var"}, tmp_path / "other", given)
    assert fields == {"var": {"sink_dims": [0, 1], "tau": 1.5}}  # --config's tau still wins when merged
    assert not (tmp_path / "other").exists()  # no directions file made for a run that brings its own


def test_bench_refuses_an_unknown_synthetic_model_or_dtype():
    from halluguard import bench

    with pytest.raises(ValueError, match="no synthetic model 'synthetic-70b'; choose from synthetic-medium"):
        bench.load("synthetic-70b", 1)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        bench.load("synthetic-medium", 1, dtype="fp8")


def test_calls_sharing_what_does_not_depend_on_the_methods_measure_it_once(monkeypatch):
    """Plain's operation counts and plain beam search are the same for every method benched on a model:
    calls given the same ``shared`` dict measure them once and all report them."""
    from halluguard import bench
    from halluguard.bench import ops

    counted, step_counts = [], ops.step_counts

    def counting(generate, new_tokens):
        counted.append(new_tokens)
        return step_counts(generate, new_tokens)

    monkeypatch.setattr(bench, "step_counts", counting)
    model, processor, inputs, _ = bench.load("testbed", 1)
    shared = {}
    first = bench.measure(model, processor, inputs, ["opera"], 2, 1, {}, echo=lambda _: None, ops=True, shared=shared)
    assert len(counted) == 3  # plain, OPERA, plain beam search
    again = bench.measure(model, processor, inputs, ["opera"], 2, 1, {}, echo=lambda _: None, ops=True, shared=shared)
    assert len(counted) == 4  # OPERA alone: plain's counts and its 5-beam search come from the first call
    assert again[-1].method == first[-1].method == "plain, 5 beams"
    assert again[-1].token_ms == first[-1].token_ms and again[-1].ops_per_token == first[-1].ops_per_token
    assert again[0].ops_per_token == first[0].ops_per_token


def test_a_method_that_searches_with_beams_is_read_against_plain_beam_search(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--methods", "opera", "vhr", "--new-tokens", "2", "--repeats", "1", "--ops", "--json", str(out)]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "opera", "vhr", "plain, 5 beams"]  # OPERA's 5 beams; none for VHR alone
    beams = rows["plain, 5 beams"]
    assert beams["ops_per_token"] > rows["plain"]["ops_per_token"]  # a search of 5 beams, not greedy decoding
    assert beams["forwards_per_token"] == 1.0  # the beams ride as rows of one forward
    config = json.dumps({"opera": {"num_beams": 3}})
    assert main([*argv[:2], "opera", *argv[4:], "--config", config]) == 0
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["plain", "opera", "plain, 3 beams"]
