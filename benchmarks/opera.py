"""OPERA's cost per decoded token and in memory, against transformers' beam search with the same beams
and against the official approach re-enacted, in one run.

    python benchmarks/opera.py                                        # synthetic-medium, 5 beams, 5 candidates
    python benchmarks/opera.py --new-tokens 32 --repeats 3 --threads 2 --json opera.json

Three searches decode the same prompt with ``B`` beams:

* ``beam search``: transformers' ``generate(num_beams=B)``;
* ``halluguard opera``: the guarded model with ``"opera"`` (``N`` candidates; rollbacks as they come);
* ``official re-enacted``: the official loop's work on current transformers: eager attention with
  ``output_attentions=True`` at every forward, one main forward and ``N`` candidate forwards of ``B``
  rows per step (each candidate appended to the cache and cropped off again), the head-max attention
  of the last layer kept as a growing square matrix over prompt and response, the column products
  computed column by column, as the official ``opera_beam_search`` does (no rollback: it measures the
  common step).

Each is run with 1 and with ``1 + T`` new tokens; the per-token time is the difference over ``T``
(median of the repeats, runs interleaved after a warm-up). Peak memory: each search runs once more
(``1 + T`` tokens) in a fresh process, whose peak resident memory from after the model is built
(Linux's high-water mark, reset then) is reported beside that of a process that only runs the prompt
("model"), so the difference is the search's own memory. Timings are for reading, not for tests.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import halluguard as hg
from halluguard import compat


def peak_rss_mb(name: str, new_tokens: int, args: argparse.Namespace) -> float:
    """Peak resident memory (MB) of ``name``'s run in a fresh process, counted from after the model is
    built (the kernel's high-water mark is reset then, so building the weights does not hide it)."""
    command = [sys.executable, __file__, "--only", name, "--new-tokens", str(new_tokens)]
    command += ["--beams", str(args.beams), "--candidates", str(args.candidates)]
    out = subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / 1024


def high_water_kb() -> int:
    """The process's peak resident set size since the last reset (VmHWM, kB)."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak becomes the current resident size


@torch.no_grad()
def official(model, inputs: dict, beams: int, candidates: int, new_tokens: int, sigma: float = 50.0) -> torch.Tensor:
    """The official OPERA step's work (see the module docstring); returns the best beam's tokens."""
    ids = inputs["input_ids"].repeat_interleave(beams, 0)
    mask = inputs["attention_mask"].repeat_interleave(beams, 0)
    pixels = inputs["pixel_values"].repeat_interleave(beams, 0)
    prompt = ids.shape[1]
    cache = DynamicCache()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    out = model(**inputs, **{compat.CACHE: cache}, output_attentions=True)
    previous = out.attentions[-1].amax(1, keepdim=True)  # (B, 1, q, kv): every row so far
    logits = out.logits[:, -1].float()
    scores = torch.zeros(beams)
    scores[1:] = -1e9
    tokens = ids
    for _ in range(new_tokens):
        top, cand = logits.topk(candidates, dim=-1)
        rows = []
        for c in range(candidates):
            step_mask = torch.cat([mask, mask.new_ones(beams, 1)], 1)
            look = model(
                input_ids=cand[:, c : c + 1], attention_mask=step_mask, **{compat.CACHE: cache}, output_attentions=True
            )
            cache.crop(-1)
            rows.append(look.attentions[-1].amax(1, keepdim=True))  # (B, 1, 1, kv + 1)
        square = torch.cat([previous, previous.new_zeros(*previous.shape[:-1], 1)], -1)
        last = torch.cat([torch.cat([square, r], -2) for r in rows], 1)  # (B, N, q + 1, kv + 1)
        last = last / last.sum(-1, keepdim=True)
        local = sigma * last[:, :, prompt:, prompt:]
        psi = torch.zeros(local.shape[0], local.shape[1], local.shape[-1], dtype=torch.float16)
        for j in range(local.shape[-1]):
            psi[..., j] = (1e-7 * local[..., j:, j].prod(-1)).to(torch.float16)
        penalty = psi.float().max(-1).values
        if local.shape[-1] <= 10:
            penalty = -last[:, :, -1, :prompt].sum(-1)  # the image bonus (here: the whole prompt)
        full = torch.full_like(logits, -999.0).scatter(1, cand, top - penalty)
        total = (torch.log_softmax(full, -1) + scores[:, None]).view(-1)
        best, index = total.topk(beams)
        parents, chosen = index // logits.shape[-1], index % logits.shape[-1]
        scores = best
        cache.reorder_cache(parents)
        previous = previous[parents]
        tokens = torch.cat([tokens[parents], chosen[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(beams, 1)], 1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, **{compat.CACHE: cache}, output_attentions=True)
        row = out.attentions[-1].amax(1, keepdim=True)
        previous = torch.cat([torch.cat([previous, previous.new_zeros(*previous.shape[:-1], 1)], -1), row], -2)
        logits = out.logits[:, -1].float()
    return tokens[0, prompt:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one run, for the memory measurement
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from halluguard.bench import synthetic

    B, N, T = args.beams, args.candidates, args.new_tokens
    inputs = synthetic.inputs(1)
    # a memory run builds only the model it runs, so every process holds one copy of the weights
    model = synthetic.build() if args.only != "official re-enacted" else None
    eager = None
    if args.only in (None, "official re-enacted"):
        eager = synthetic.build()
        eager.set_attn_implementation("eager")
    cfg = hg.get_config("opera", num_attn_candidates=N)

    def beam(n):
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, num_beams=B, do_sample=False)

    def ours(n):
        with hg.wrap(model, methods=[cfg]):
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, num_beams=B, do_sample=False)

    def theirs(n):
        official(eager, inputs, B, N, n)

    def prompt_only(n):
        model(**inputs)

    runs = {"beam search": beam, "halluguard opera": ours, "official re-enacted": theirs}
    if args.only is not None:
        reset_high_water()
        with torch.no_grad():
            {**runs, "model": prompt_only}[args.only](T)
        print(high_water_kb())
        return
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 1 + T: []} for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run(2)
        for _ in range(args.repeats):
            for name, run in runs.items():
                for n in (1, 1 + T):
                    start = time.perf_counter()
                    run(n)
                    times[name][n].append(time.perf_counter() - start)
    baseline = peak_rss_mb("model", 1 + T, args)
    results = {}
    for name in runs:
        per_token = [(b - a) / T for a, b in zip(times[name][1], times[name][1 + T])]
        results[name] = {"per_token_s": statistics.median(per_token), "peak_rss_mb": peak_rss_mb(name, 1 + T, args)}
    base = results["beam search"]["per_token_s"]
    print(f"synthetic-medium (random, ~146M), batch 1, {B} beams, {N} candidates, {T} new tokens, ", end="")
    print(f"{args.repeats} repeats; peak RSS of a process that only runs the prompt: {baseline:.0f} MB")
    print("| search | per token (ms) | vs beam search | peak RSS (MB) | above the prompt-only run (MB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        r["ratio"] = r["per_token_s"] / base
        r["above_prompt_mb"] = r["peak_rss_mb"] - baseline
        print(
            f"| {name} | {1000 * r['per_token_s']:.1f} | {r['ratio']:.2f}x | {r['peak_rss_mb']:.0f} | "
            f"{r['above_prompt_mb']:.0f} |"
        )
    ratio = results["official re-enacted"]["per_token_s"] / results["halluguard opera"]["per_token_s"]
    print(f"halluguard opera is {ratio:.1f}x faster than the official approach per token")
    if args.json:
        out = {"settings": vars(args), "prompt_only_peak_rss_mb": baseline, "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
