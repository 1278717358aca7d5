"""Decode overhead of each method against plain ``generate``, measured in the same run.

    python benchmarks/overhead.py                                  # shipped test model: VHR, VAR, PAI
    python benchmarks/overhead.py --methods pai --config '{"pai": {"use_cfg": true}}'   # PAI with guidance
    python benchmarks/overhead.py --model llava-hf/llava-1.5-7b-hf --methods pai var

Every configuration generates the same batch with greedy decoding and a fixed number of new
tokens; plain and guarded runs are interleaved and repeated, and the median time of each is
reported with its ratio to plain. Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import halluguard as hg
from halluguard.cli import method_configs
from halluguard.eval.runner import build_prompt, load_model


def inputs_for(model_spec: str, processor, batch: int):
    if model_spec == "testbed":
        from halluguard.testbed import world

        images = [s.render() for s in world.scenes("misleading", batch)]
    else:
        from PIL import Image

        images = [Image.new("RGB", (336, 336), (120 + 20 * i, 110, 100)) for i in range(batch)]
    prompts = [build_prompt(processor, "Please describe this image in detail.")] * batch
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--methods", nargs="+", default=["vhr", "var", "pai"])
    parser.add_argument(
        "--config",
        default='{"var": {"sink_dims": [0, 1], "tau": 1.5}}',
        help="JSON overrides per method (the default gives VAR sinks on models without a table entry)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, processor, name = load_model(args.model)
    inputs = inputs_for(args.model, processor, args.batch).to(next(model.parameters()).device)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    overrides = json.loads(args.config) if args.config else {}

    def plain():
        with torch.no_grad():
            model.generate(**inputs, **settings)

    plain()  # warm-up
    rows = []
    for spec in args.methods:
        configs = method_configs(spec, json.dumps({n: overrides[n] for n in spec.split("+") if n in overrides}) or None)
        guard = hg.wrap(model, processor, configs)
        try:
            guarded_times, plain_times = [], []
            for _ in range(args.repeats):
                guard.unwrap()
                plain_times += timed(plain, 1)
                guard = hg.wrap(model, processor, configs)
                guarded_times += timed(plain, 1)
        finally:
            guard.unwrap()
        p, g = statistics.median(plain_times), statistics.median(guarded_times)
        rows.append((spec, p, g))
    tokens = args.batch * args.new_tokens
    print(
        f"model {name}, batch {args.batch}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print("| method | plain s | guarded s | ratio | guarded tokens/s |")
    print("|---|---|---|---|---|")
    for spec, p, g in rows:
        print(f"| {spec} | {p:.3f} | {g:.3f} | {g / p:.2f}x | {tokens / g:.0f} |")


if __name__ == "__main__":
    main()
