"""Measure a method with CHAIR and POPE on the shipped test model, beside plain decoding.

    python demos/evaluate.py                 # VCD, 50 scenes per split, a few minutes on a CPU
    python demos/evaluate.py --method pai --num-images 100

The same commands run on COCO with a real checkpoint (see the README's Evaluation section):
``halluguard eval chair --model llava-hf/llava-1.5-7b-hf --coco-images DIR --method vcd``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from halluguard.cli import main as halluguard


def run(*argv: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        code = halluguard([*argv, "--out", out])
        if code != 0:
            raise SystemExit(code)
        return json.loads((Path(out) / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="vcd")
    parser.add_argument("--num-images", default="50")
    args = parser.parse_args()
    rows = []
    for method in (None, args.method):
        extra = ["--method", method] if method else []
        chair = run("eval", "chair", "--model", "testbed", "--split", "misleading", "--num-images", args.num_images,
                    "--max-new-tokens", "64", *extra)  # fmt: skip
        pope = run("eval", "pope", "--model", "testbed", "--num-images", args.num_images, *extra)
        c, p = chair["metrics"], pope["metrics"]
        splits = "/".join(f"{p[k]['accuracy']:.1f}" for k in ("random", "popular", "adversarial"))
        rows.append(f"{method or 'plain':8s} CHAIR_s {c['chair_s']:5.1f}  CHAIR_i {c['chair_i']:4.1f}  "
                    f"recall {c['recall']:4.1f} | POPE accuracy r/p/a {splits}")  # fmt: skip
    print("\n".join(["", *rows]))


if __name__ == "__main__":
    main()
