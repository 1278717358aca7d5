"""What each method costs against plain ``generate``, prompt phase and per decoded token, in one run.

    python benchmarks/overhead.py                                   # shipped test model: VHR, VAR, PAI
    python benchmarks/overhead.py --model synthetic-medium --batch 1 --methods vhr pai
    python benchmarks/overhead.py --methods pai --config '{"pai": {"separate_stream": true}}'
    python benchmarks/overhead.py --model llava-hf/llava-1.5-7b-hf --methods pai var
    python benchmarks/overhead.py --model synthetic-medium --methods vcd vcd@separate   # rows vs two forwards

For each method the same batch is generated greedily twice, with 1 new token (the prompt phase:
the prefill and whatever a method adds to it) and with ``1 + N`` new tokens; the per-token decode
time is the difference divided by ``N``. Plain and guarded runs alternate after a warm-up and the
median of the repeats is reported with its ratio to plain. A spec ending in ``@separate`` runs the
methods' branch streams as their own forwards (``separate_stream``: the official two-forward way).
Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import halluguard as hg
from halluguard.bench import load
from halluguard.registry import configs_from_spec as method_configs

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def seconds(model, inputs, new_tokens: int, clock=time.perf_counter) -> float:
    start = clock()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed", help="testbed, synthetic-medium, or a checkpoint")
    parser.add_argument("--methods", nargs="+", default=["vhr", "var", "pai"])
    parser.add_argument(
        "--config",
        default='{"var": {"sink_dims": [0, 1], "tau": 1.5}}',
        help="JSON overrides per method (the default gives VAR sinks on models without a table entry)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time: with --threads 1, steady on a machine shared with other work",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _, inputs, name = load(args.model, args.batch)
    overrides = json.loads(args.config) if args.config else {}
    seconds(model, inputs, 2)  # warm-up
    print(
        f"model {name}, batch {args.batch}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}, {args.clock} clock"
    )
    print("| method | prompt phase plain / guarded (s) | ratio | per token plain / guarded (ms) | ratio |")
    print("|---|---|---|---|---|", flush=True)
    for spec in args.methods:
        names, _, variant = spec.partition("@")
        chosen = {n: overrides[n] for n in names.split("+") if n in overrides}
        configs = method_configs(names, json.dumps(chosen) if chosen else None)
        if variant == "separate":
            configs = [c.replace(separate_stream=True) if hasattr(c, "separate_stream") else c for c in configs]
        elif variant:
            parser.error(f"unknown variant @{variant} (known: @separate)")
        times = {key: [] for key in ("plain prompt", "plain full", "prompt", "full")}
        for _ in range(args.repeats):
            times["plain prompt"].append(seconds(model, inputs, 1, clock))
            times["plain full"].append(seconds(model, inputs, 1 + args.new_tokens, clock))
            with hg.wrap(model, None, configs):
                times["prompt"].append(seconds(model, inputs, 1, clock))
                times["full"].append(seconds(model, inputs, 1 + args.new_tokens, clock))
        m = {key: statistics.median(values) for key, values in times.items()}
        plain_token = (m["plain full"] - m["plain prompt"]) / args.new_tokens
        token = (m["full"] - m["prompt"]) / args.new_tokens
        pp, gp, pt, gt = m["plain prompt"], m["prompt"], plain_token, token
        print(
            f"| {spec} | {pp:.3f} / {gp:.3f} | {gp / pp:.2f}x | {pt * 1e3:.1f} / {gt * 1e3:.1f} | {gt / pt:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
