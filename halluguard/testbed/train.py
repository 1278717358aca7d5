"""Train the shipped test model from scratch on the synthetic world (CPU, reproducible from a seed).

    python -m halluguard.testbed.train --out /tmp/base --steps 4400
    python -m halluguard.testbed.train --init /tmp/base --first-step 4400 --steps 1000 --lr 3e-4 \
        --warmup 50 --out halluguard/testbed/model

The second command continues the first (``--init``: start from its weights; ``--first-step``:
the data stream and curriculum go on from there) with a short, lower learning-rate phase; the
report sums both phases' minutes and keeps both histories. Together they take about 45 minutes
on 2 cores (the shipped model's report gives the measured times).

Every step draws a fresh batch of training scenes (a curriculum starts with one object per scene
and reaches the full world at step 1100); ``CAPTION_SHARE`` of the examples are captions ("Describe
the image." and variants), the others POPE-style yes/no questions with random, popular and adversarial negatives. An
auxiliary object-presence loss on the vision tower's patches (a training-only head) gets the
vision tower going from the first step. The language-model loss is on the answer tokens only.
Held-out metrics are printed periodically; the final evaluation is written to ``report.json`` and
``REPORT.md`` beside the weights (fp16 safetensors, loaded back in fp32 by
``halluguard.testbed.load``). Training stops at ``--steps`` or after ``--minutes``, whichever
comes first, so a slower machine trains fewer steps.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import world
from .evaluate import evaluate
from .model import PROMPT_TEMPLATE, build_model, build_processor

CAPTION_PROMPTS = [
    "Describe the image.",
    "Please describe this image in detail.",
    "What is in the image?",
    "Describe this image.",
    "Please help me describe the image in detail.",
]
QUESTION_SUFFIXES = [
    "",
    " Answer the question using a single word or phrase.",
    " Please answer this question with one word.",
]


CAPTION_SHARE = 0.3  # of training examples by default; the rest are yes/no questions


def make_example(
    scene: world.Scene, rng: np.random.Generator, popularity, cooc, caption_share: float = CAPTION_SHARE
) -> tuple[str, str]:
    """(prompt text, answer) for one scene: a caption or a yes/no question."""
    if rng.random() < caption_share:
        return str(rng.choice(CAPTION_PROMPTS)), scene.caption
    kind = str(rng.choice(["random", "popular", "adversarial"]))
    q = rng.choice(world.pope_questions(scene, kind, rng, per_side=1, popularity=popularity, cooc=cooc))
    return q["text"] + str(rng.choice(QUESTION_SUFFIXES)), q["label"]


def make_batch(
    processor, scenes: list[world.Scene], rng, popularity, cooc, caption_share: float = CAPTION_SHARE
) -> dict:
    prompts, answers = zip(*(make_example(s, rng, popularity, cooc, caption_share) for s in scenes))
    texts = [PROMPT_TEMPLATE.format(text=p) + " " + a + "</s>" for p, a in zip(prompts, answers)]
    enc = processor(images=[s.render() for s in scenes], text=texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    assistant = processor.tokenizer.convert_tokens_to_ids("assistant")
    for row in range(labels.shape[0]):
        start = int((enc["input_ids"][row] == assistant).nonzero()[-1]) + 2  # after "assistant :"
        labels[row, :start] = -100
    labels[enc["attention_mask"] == 0] = -100
    enc["labels"] = labels
    return enc


CURRICULUM = ((300, 1), (700, 2), (1100, 3))  # (until step, at most this many objects per scene)


def max_objects_at(step: int) -> int | None:
    """Objects per training scene: one at first, so the image must be read to caption it, then more."""
    for until, cap in CURRICULUM:
        if step < until:
            return cap
    return None


class ObjectPresenceHead(torch.nn.Module):
    """Training-only auxiliary head: which categories appear, read from the vision tower's patches.

    ``logit_c = max over patches p of w_c . h_p + b_c``, trained with binary cross-entropy against
    the scene's categories. It gives the vision tower a direct signal from the first step (a small
    LVLM trained from scratch otherwise sits on a long plateau, describing the prior, before it
    learns to look); it is not part of the saved model.
    """

    def __init__(self, model, num_categories: int):
        super().__init__()
        self.linear = torch.nn.Linear(model.config.vision_config.hidden_size, num_categories)
        self.features = None
        self.handle = model.model.vision_tower.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output.last_hidden_state[:, 1:]  # patches, without the class token

    def loss(self, scenes: list[world.Scene]) -> torch.Tensor:
        logits = self.linear(self.features).amax(dim=1)
        target = torch.zeros_like(logits)
        for row, scene in enumerate(scenes):
            for category in scene.categories:
                target[row, world.CATEGORIES.index(category)] = 1.0
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def summary(metrics: dict) -> str:
    return (
        f"recall {metrics['test']['recall']:.1f}  chair_i {metrics['test']['chair_i']:.1f}  "
        f"misleading chair_i {metrics['misleading']['chair_i']:.1f}  "
        f"pope acc r/p/a {metrics['pope_random']['accuracy']:.1f}/{metrics['pope_popular']['accuracy']:.1f}/"
        f"{metrics['pope_adversarial']['accuracy']:.1f}"
    )


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["final"]
    lines = [
        "# halluguard test model: training report",
        "",
        f"LLaVA architecture, {report['parameters'] / 1e6:.2f}M parameters, {report['weights_mb']:.1f} MB of fp16 "
        f"safetensors; trained from scratch for {report['steps']} steps (batch {report['batch_size']}, seed "
        f"{report['seed']}) in {report['train_minutes']:.1f} minutes on {report['machine']}"
        + (
            " in phases: "
            + "; ".join(
                f"steps {p['first_step']}-{p['first_step'] + p['steps']} at peak lr {p['lr']:g} "
                f"({p['minutes']:.1f} min)"
                for p in report.get("phases", [])
            )
            if len(report.get("phases", [])) > 1
            else ""
        )
        + ".",
        "",
        f"Final evaluation ({m['test']['n']} held-out scenes per caption split, greedy decoding):",
        "",
        "| split | object recall | CHAIR_s | CHAIR_i |",
        "|---|---|---|---|",
        *(
            f"| {label} | {m[split]['recall']:.1f} | {m[split]['chair_s']:.1f} | {m[split]['chair_i']:.1f} |"
            for split, label in (
                ("test", "test (held-out, training distribution)"),
                ("misleading", "misleading (A without its usual partner B)"),
            )
        ),
        "",
        "| POPE split | accuracy | precision | recall | F1 | yes-ratio | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("random", "popular", "adversarial"):
        p = m[f"pope_{kind}"]
        lines.append(
            f"| {kind} | {p['accuracy']:.1f} | {p['precision']:.1f} | {p['recall']:.1f} | {p['f1']:.1f} | "
            f"{p['yes_ratio']:.1f} | {p['n']} |"
        )
    lines += [
        "",
        f"Generation speed (greedy captions, batch 1, {report['speed']['threads']} threads): "
        f"{report['speed']['tokens_per_s']:.0f} tokens/s.",
        "",
        "Examples (misleading split):",
        "",
    ]
    for ex in m["misleading"]["examples"]:
        lines.append(f"- truth: {ex['truth']}  \n  model: {ex['caption']}")
    lines += ["", "Held-out metrics during training:", "", "| step | minutes | loss | summary |", "|---|---|---|---|"]
    for h in report["history"]:
        lines.append(f"| {h['step']} | {h['minutes']:.1f} | {h['loss']:.3f} | {h['summary']} |")
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def _phase(report: dict) -> dict:
    """A phase entry for a report written before phases were recorded."""
    return {"first_step": 0, "steps": report["steps"], "lr": report["lr"], "minutes": report["train_minutes"]}


def measure_speed(model, processor, threads: int) -> dict:
    from .evaluate import CAPTION_PROMPT, generate_texts

    scene_list = list(world.scenes("test", 20, 0, start=10_000))
    t0 = time.perf_counter()
    tokens = 0
    for s in scene_list:
        text = generate_texts(model, processor, [s.render()], [CAPTION_PROMPT], 48)[0]
        tokens += len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "threads": threads}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "model"), help="output folder")
    parser.add_argument("--steps", type=int, default=4400)
    parser.add_argument("--minutes", type=float, default=40.0, help="stop training after this long, whatever the step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument(
        "--presence-weight", type=float, default=1.0, help="weight of the auxiliary object-presence loss"
    )
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--eval-count", type=int, default=100, help="scenes per split in periodic evaluations")
    parser.add_argument("--final-count", type=int, default=500, help="scenes per split in the final evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--caption-share", type=float, default=CAPTION_SHARE, help="share of caption examples")
    parser.add_argument("--init", default=None, help="continue from the model (and report) in this folder")
    parser.add_argument(
        "--first-step",
        type=int,
        default=0,
        help="global index of this run's first step (data stream and curriculum), with --init",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    train_processor = build_processor()
    train_processor.tokenizer.padding_side = "right"
    previous = None
    if args.init:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        report_file = Path(args.init) / "report.json"
        previous = json.loads(report_file.read_text()) if report_file.exists() else None
    else:
        model = build_model(args.seed)
    presence = ObjectPresenceHead(model, len(world.CATEGORIES))
    params = list(model.named_parameters()) + list(presence.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    popularity, cooc = world.category_frequencies(seed=args.seed), world.cooccurrence(seed=args.seed)
    rng = np.random.default_rng([args.seed, 99, args.first_step])
    history, losses = [], []
    previous_minutes = previous["train_minutes"] if previous else 0.0
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    step = 0
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        at = args.first_step + step
        batch_scenes = list(
            world.scenes(
                "train", args.batch_size, args.seed, start=at * args.batch_size, max_objects=max_objects_at(at)
            )
        )
        batch = make_batch(train_processor, batch_scenes, rng, popularity, cooc, args.caption_share)
        lm_loss = model(**batch).loss
        loss = lm_loss + args.presence_weight * presence.loss(batch_scenes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        optimizer.step()
        losses.append(lm_loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        minutes = (time.perf_counter() - start) / 60
        last = step + 1 == args.steps or minutes >= args.minutes
        if (step + 1) % args.eval_every == 0 and not last:
            metrics = evaluate(
                model, processor, count=args.eval_count, pope_images=args.eval_count // 2, seed=args.seed
            )
            history.append(
                {
                    "step": at + 1,
                    "minutes": minutes + previous_minutes,
                    "loss": float(np.mean(losses[-50:])),
                    "summary": summary(metrics),
                }
            )
            tqdm.write(f"step {step + 1} ({minutes:.1f} min): {history[-1]['summary']}")
        if last:
            break
    train_minutes = (time.perf_counter() - start) / 60 + previous_minutes
    presence.handle.remove()
    model.eval()
    final = evaluate(model, processor, count=args.final_count, pope_images=args.final_count // 2, seed=args.seed)
    history.append(
        {
            "step": args.first_step + step + 1,
            "minutes": train_minutes,
            "loss": float(np.mean(losses[-50:])),
            "summary": summary(final),
        }
    )
    print("final:", summary(final))
    speed = measure_speed(model, processor, args.threads)

    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    weights_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_mb": weights_mb,
        "steps": args.first_step + step + 1,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_minutes": train_minutes,
        "machine": f"{platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "final": final,
        "history": history,
        "speed": speed,
        "phases": (previous or {}).get("phases", [_phase(previous)] if previous else [])
        + [
            {
                "first_step": args.first_step,
                "steps": step + 1,
                "lr": args.lr,
                "warmup": args.warmup,
                "minutes": train_minutes - previous_minutes,
                "caption_share": args.caption_share,
            }
        ],
    }
    if previous:
        report["history"] = (
            previous["history"][:-1]
            + [dict(h, summary="(end of phase) " + h["summary"]) for h in previous["history"][-1:]]
            + history
        )
    write_report(out, report)
    print(f"saved to {out} ({weights_mb:.1f} MB)")


if __name__ == "__main__":
    main()
