"""Report tables name model and data; the chart's legend covers no bar; unusable runs are refused."""

import json

import pytest

from halluguard.eval import report


def chair_result(model="testbed", split="misleading", methods=(), chair_s=80.0, failed=0):
    metrics = {"chair_s": chair_s, "chair_i": 30.0, "recall": 70.0, "len": 12.0, "n": 500 - failed}
    return {
        "task": "chair",
        "dataset": "testbed",
        "split": split,
        "model": model,
        "methods": list(methods),
        "metrics": metrics,
        "failed": {"count": failed, "first": []},
    }


def pope_result(model="llava-hf/llava-1.5-7b-hf"):
    m = {"accuracy": 85.0, "precision": 88.0, "recall": 80.0, "f1": 84.0, "yes_ratio": 48.0, "n": 3000}
    return {"task": "pope", "dataset": "coco", "model": model, "methods": [], "metrics": {"random": m, "popular": m}}


def test_tables_name_the_model_and_the_data():
    table = report.chair_table([chair_result(), chair_result("/models/my-llava", "test", failed=2)])
    assert "| model | data | method |" in table
    assert "| testbed | testbed misleading | vanilla | 80.0 |" in table
    assert "| my-llava | testbed test | vanilla |" in table and "| 498 (2 failed) |" in table
    table = report.pope_table([pope_result()])
    assert "| llava-hf/llava-1.5-7b-hf | coco | vanilla | random | 85.0 |" in table


def test_a_partner_column_appears_when_a_run_has_the_testbed_partner_rate():
    plain = report.chair_table([chair_result()])
    assert "partner" not in plain
    with_partner = chair_result()
    with_partner["metrics"]["partner_named"] = 26.0
    table = report.chair_table([with_partner, chair_result(split="test")]).splitlines()
    assert table[0].split(" | ")[6] == "partner" and table[1].count("|") == table[0].count("|")
    assert "| 70.0 | 26.0 | 12.0 |" in table[2] and "| 70.0 | - | 12.0 |" in table[3]


@pytest.mark.parametrize("task", ["chair", "pope"])
@pytest.mark.parametrize("count", [1, 3, 6])
def test_the_chart_legend_covers_no_bar(task, count):
    import matplotlib.pyplot as plt

    if task == "chair":
        runs = [chair_result(chair_s=100.0 - 5 * i) for i in range(count)]  # tall bars, where a legend would sit
    else:
        runs = [pope_result() for _ in range(count)]
    fig = report.build_chart(runs, task)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in ax.patches]
    assert len(bars) == count * (2 if task == "chair" else 3)
    assert not any(legend.overlaps(bar) for bar in bars)
    texts = [t.get_window_extent(renderer) for t in ax.texts]  # the value labels
    assert not any(legend.overlaps(t) for t in texts)
    plt.close(fig)


def test_unusable_runs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no runs to report"):
        report.report([])
    with pytest.raises(ValueError, match="no such run folder"):
        report.load_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="no results.json"):
        report.load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({**chair_result(), "metrics": {}}))
    with pytest.raises(ValueError, match="the run has no scores"):
        report.load_run(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(ValueError, match="not a results file"):
        report.load_run(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(chair_result()))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(pope_result()))
    with pytest.raises(ValueError, match="one task at a time"):
        report.report([tmp_path / "a", tmp_path / "b"])


def test_chart_labels_say_what_differs_and_do_not_collide():
    import matplotlib.pyplot as plt

    runs = [chair_result(split=split, methods=methods) for split in ("misleading", "test") for methods in ((), ())]
    runs += [chair_result(model="/models/other-llava", split="test")]
    fig = report.build_chart(runs, "chair")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in ticks][-1] == "vanilla\nother-llava\ntestbed test"
    boxes = [t.get_window_extent(renderer) for t in ticks]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert ax.get_title() == "CHAIR (lower is better)"  # nothing shared: the labels say it all
    plt.close(fig)
