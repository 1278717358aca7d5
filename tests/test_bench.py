"""``halluguard bench``: the table, JSON and chart it writes (structure only: timings are not tested)."""

from __future__ import annotations

import json

from halluguard.cli import main


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
    argv = ["bench", "--methods", "vhr", "--new-tokens", "2", "--repeats", "1", "--official", "--json", str(out)]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "vhr", *bench.OFFICIAL]
    forwards = [rows[name]["forwards_per_token"] for name in bench.OFFICIAL]
    assert forwards == [1.0, 2.0, 1.0]  # maps; maps and a second sequential forward; beams in one forward
    text = loaded["model"].config.get_text_config(decoder=True)
    assert text._attn_implementation == "sdpa"
