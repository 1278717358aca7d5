"""POPE on the test model's world two ways: ``halluguard eval pope`` and lmms-eval's ``halluguard``
model on the same questions (``halluguard.integrations.lmms_eval.tasks``), answer by answer.

For each method and split: how many answers the two routes share, the accuracy each reports (ours:
the ``pope`` rule, the first sentence read for a "no"; lmms-eval: the answer, lower-cased and
stripped, must be exactly "yes"), and our answers rescored by lmms-eval's rule. Needs lmms-eval,
installed as the README says. Prints a markdown table; ``--json FILE`` keeps the rows.

    python benchmarks/lmms_eval_compare.py --num-images 100 --methods none vcd
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path


def ours(out: Path, method: str, split: str, args) -> tuple[list[dict], dict]:
    from halluguard import cli

    argv = ["eval", "pope", "--dataset", "testbed", "--num-images", str(args.num_images), "--splits", split]
    argv += ["--batch-size", str(args.batch_size), "--out", str(out), "--seed", str(args.seed)]
    if method != "none":
        argv += ["--method", method]
    with contextlib.redirect_stdout(sys.stderr):  # its own table: the comparison is the output
        status = cli.main(argv)
    if status != 0:
        raise SystemExit(f"halluguard eval pope failed for {method} {split}")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["question_id"]), json.loads((out / "results.json").read_text())


def theirs(task_dir: Path, method: str, split: str, args) -> tuple[list[str], dict]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    task = f"halluguard_testbed_pope_{split}"
    model_args = "pretrained=testbed" + ("" if method == "none" else f",methods={method}")
    results = simple_evaluate(
        model="halluguard",
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=args.batch_size,
        log_samples=True,
        verbosity="ERROR",
    )
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples], results["results"][task]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=100, help="held-out scenes, 6 questions each")
    parser.add_argument("--splits", nargs="+", default=["random", "popular", "adversarial"])
    parser.add_argument("--methods", nargs="+", default=["none", "vcd"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from halluguard.integrations.lmms_eval.tasks import write_testbed_pope

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = Path(tmp) / "tasks"
        write_testbed_pope(task_dir, splits=tuple(args.splits), num_images=args.num_images, seed=args.seed)
        for method in args.methods:
            for split in args.splits:
                our_rows, our_results = ours(Path(tmp) / f"{method}-{split}", method, split, args)
                answers, scores = theirs(task_dir, method, split, args)
                exact = [r["output"].lower().strip() == r["label"] for r in our_rows]
                rows.append(
                    {
                        "method": method,
                        "split": split,
                        "questions": len(answers),
                        "same_answers": sum(a == r["output"] for a, r in zip(answers, our_rows)),
                        "not_exactly_yes_or_no": sum(a.lower().strip() not in ("yes", "no") for a in answers),
                        "ours_accuracy": our_results["metrics"][split]["accuracy"],
                        "lmms_eval_accuracy": 100 * scores["pope_accuracy,none"],
                        "ours_rescored_exact": 100 * sum(exact) / len(exact),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| method | split | questions | same answers | not exactly yes/no | halluguard eval pope | lmms-eval "
        "| ours, lmms-eval's rule |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['split']} | {r['questions']} | {r['same_answers']} | {r['not_exactly_yes_or_no']} | "
            f"{r['ours_accuracy']:.1f} | {r['lmms_eval_accuracy']:.1f} | {r['ours_rescored_exact']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
