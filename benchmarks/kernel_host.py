"""The decode-attention launcher's own host work per call, on any machine: the Triton launches are
replaced by no-ops, so what is left is the plan, the input conversions, the buffers and the argument
lists a call builds before its launches (Triton's own launch path is not counted).

    python benchmarks/kernel_host.py                    # LLaVA-1.5-7B shapes, batch 1, 2048 keys
    python benchmarks/kernel_host.py --batch 8 --cache 4096

Per case (the edits of ``kernel_bench.py``), with a kept workspace as a guarded decode step calls it:
Python function calls per call (cProfile's count, builtins included: does not vary between runs),
aten operations per call (tensors made or converted), and the median time per call over 7 rounds
(varies with the machine's load). At batch 1 a decode step on a GPU waits for this work: it is what
the kernel costs beyond SDPA there, with the launches.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_bench import make_inputs


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", type=int, default=2048, help="keys")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    if min(args.batch, args.cache, args.heads, args.kv_heads, args.head_dim) < 1:
        parser.error("--batch, --cache, --heads, --kv-heads and --head-dim need whole numbers >= 1")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")

    import halluguard.kernels.decode_attention as launcher
    from halluguard.attention.derived import Derived
    from halluguard.bench.ops import count

    launcher._partials_kernel = launcher._merge_kernel = launcher._rows_kernel = _NoLaunch()
    launcher.require_triton = lambda: None  # no Triton is launched, so none is needed
    (q, k, v), edits = make_inputs(
        args.batch, args.heads, args.kv_heads, args.cache, args.head_dim, torch.float16, "cpu"
    )
    print(f"batch {args.batch}, {args.cache} keys, {args.heads} heads ({args.kv_heads} key/value), ", end="")
    print(f"head dim {args.head_dim}")
    print("| case | Python calls / call | aten ops / call | µs / call (median of 7) |")
    print("|---|---|---|---|")
    for name, extra in edits.items():
        workspace = Derived()

        def call(extra=extra, workspace=workspace):
            return launcher.decode_attention(q, k, v, scaling=args.head_dim**-0.5, workspace=workspace, **extra)

        for _ in range(200):  # the workspace fills; the interpreter warms
            call()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(100):
            call()
        profile.disable()
        calls = pstats.Stats(profile).total_calls / 100
        rounds = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(1000):
                call()
            rounds.append((time.perf_counter() - start) / 1000 * 1e6)
        print(f"| {name} | {calls:.0f} | {count(call).aten} | {statistics.median(rounds):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
