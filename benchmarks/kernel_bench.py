"""The decode-attention kernel against SDPA and the PyTorch reference, on a CUDA GPU.

    python benchmarks/kernel_bench.py                                  # LLaVA-1.5-7B shapes (32 heads, MHA)
    python benchmarks/kernel_bench.py --kv-heads 8 --dtype bfloat16    # a GQA model (Llama-3-8B shapes)
    python benchmarks/kernel_bench.py --cache 1024 8192 --batch 1 8 --json results.json

For each cache length and batch size, one decode query row per batch row attends over a random
KV cache in the HF layout ``(B, Hkv, T, D)``, timed with CUDA events (median of ``--repeats`` after a
warm-up, ``triton.testing.do_bench``):

* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (the model's own decode attention, no edits);
* ``kernel``: halluguard's kernel with no edit, then with each method's edit and statistics, each case
  keeping its input conversions and internal buffers between calls as a guarded decode step does
  (a ``Derived`` workspace):
  ``pai`` (a boost on image keys), ``var`` (gated redistribution from sink keys to image keys),
  ``lookback`` (three group masses), ``opera`` (the head-max row, a second pass over the keys);
* ``reference``: the PyTorch reference path (materialised probabilities) with the ``var`` edit.

Achieved bandwidth counts the bytes each call must read and write at least (K and V once, the query,
the output) over its time, as a fraction of the device's peak (``--peak-gbps``, or a table of known
devices). On a machine without CUDA it says so and exits: the Triton interpreter is for
correctness tests only (``tests/test_kernel_*.py``). Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch

# HBM peak bandwidth in GB/s by device name fragment (vendor data sheets)
PEAK_GBPS = {
    "H200": 4800,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10G": 600,
    "RTX 4090": 1008,
    "RTX 3090": 936,
}


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def make_inputs(batch, heads, kv_heads, kv_len, head_dim, dtype, device):
    from halluguard.attention.edits import Redistribution

    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype)
    q, k, v = (
        rand(batch, heads, 1, head_dim),
        rand(batch, kv_heads, kv_len, head_dim),
        rand(batch, kv_heads, kv_len, head_dim),
    )
    image = torch.zeros(batch, kv_len, dtype=torch.bool, device=device)
    image[:, 35 : 35 + min(576, kv_len // 2)] = True  # LLaVA-1.5's 576 image tokens after a short preamble
    sinks = torch.zeros(batch, kv_len, dtype=torch.bool, device=device)
    sinks[:, [i for i in (0, 40, 120) if i < kv_len]] = True  # those that a short cache holds
    edits = {
        "none": {},
        "pai": dict(key_boost=image.float() * 0.5),
        "var": dict(
            redistribution=Redistribution(
                source=sinks, target=image & ~sinks, keep=0.4, gate=image, gate_min_mass=0.2, gate_max_source_share=0.8
            )
        ),
        "lookback": dict(
            group_weights=torch.stack([image.float(), (~image).float(), torch.ones_like(image).float()], 1)
        ),
        "opera": dict(head_rows=True),
    }
    return (q, k, v), edits


def bench(args) -> list[dict]:
    import triton.testing

    from halluguard.attention.derived import Derived
    from halluguard.attention.reference import fused_attention_reference
    from halluguard.kernels.decode_attention import decode_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device)
    peak = peak_gbps(name, args.peak_gbps)
    rows = []
    for kv_len in args.cache:
        for batch in args.batch:
            (q, k, v), edits = make_inputs(batch, args.heads, args.kv_heads, kv_len, args.head_dim, dtype, device)
            scaling = args.head_dim**-0.5
            moved = (2 * k.numel() + 2 * q.numel()) * k.element_size()
            timed = {"sdpa": partial(sdpa, q, k, v, scale=scaling, enable_gqa=args.heads != args.kv_heads)}
            for edit, extra in edits.items():  # each case keeps its conversions and buffers, as a decode step does
                kept = Derived()
                timed[f"kernel {edit}"] = partial(decode_attention, q, k, v, scaling=scaling, workspace=kept, **extra)
            timed["reference var"] = partial(fused_attention_reference, q, k, v, scaling=scaling, **edits["var"])
            row = {"device": name, "dtype": args.dtype, "cache": kv_len, "batch": batch, "heads": args.heads}
            row["kv_heads"], row["head_dim"] = args.kv_heads, args.head_dim
            for label, fn in timed.items():
                ms = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.repeats, return_mode="median")
                row[f"{label} ms"] = ms
                row[f"{label} GB/s"] = moved / ms / 1e6
            if peak:
                row["peak GB/s"] = peak
            rows.append(row)
            print(summary(row), flush=True)
    return rows


def summary(row: dict) -> str:
    parts = [f"T={row['cache']:>6} B={row['batch']:>3}"]
    base = row["sdpa ms"]
    for label in [k[:-3] for k in row if k.endswith(" ms")]:
        ms = row[f"{label} ms"]
        frac = f" {row[f'{label} GB/s'] / row['peak GB/s']:.0%}" if "peak GB/s" in row else ""
        parts.append(f"{label} {ms * 1000:.0f}us ({ms / base:.2f}x sdpa{frac})")
    return " | ".join(parts)


def markdown(rows: list[dict]) -> str:
    labels = [k[:-3] for k in rows[0] if k.endswith(" ms")]
    head = "| T | B | " + " | ".join(f"{label} µs (x sdpa, % peak)" for label in labels) + " |"
    lines = [head, "|" + "---|" * (2 + len(labels))]
    for row in rows:
        cells = []
        for label in labels:
            ms = row[f"{label} ms"]
            frac = f", {row[f'{label} GB/s'] / row['peak GB/s']:.0%}" if "peak GB/s" in row else ""
            cells.append(f"{ms * 1000:.1f} ({ms / row['sdpa ms']:.2f}x{frac})")
        lines.append(f"| {row['cache']} | {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=int, nargs="+", default=[1024, 4096, 16384, 32768], help="KV cache lengths")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=25, help="warm-up time per case, ms")
    parser.add_argument("--repeats", type=int, default=100, help="timed time per case, ms")
    parser.add_argument("--peak-gbps", type=float, default=None, help="the device's peak memory bandwidth, GB/s")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if not torch.cuda.is_available():
        print(
            "No CUDA device: the kernel benchmark needs a GPU. On CPU, Triton's interpreter "
            "(TRITON_INTERPRET=1) runs the kernel for correctness tests only; timings would mean nothing."
        )
        return 0
    rows = bench(args)
    print()
    print(f"{rows[0]['device']}, {args.dtype}, heads {args.heads}, kv heads {args.kv_heads}, head dim {args.head_dim}")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
