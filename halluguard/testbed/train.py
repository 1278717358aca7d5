"""Train the test model from scratch (CPU, reproducible from a seed), then in a further joint phase.

    python -m halluguard.testbed.train --out /tmp/a --steps 1700 --minutes 30 --pair-probability 0.95 \
        --faint-visibility 0.04 0.14 --random-questions 0.5 --caption-share 0.35 --eval-every 700 --final-count 100
    python -m halluguard.testbed.train --init /tmp/a --first-step 2500 --steps 900 --minutes 15.27 --lr 3e-4 \
        --warmup 30 --lr-floor 0.5 --caption-share 0.25 --pair-probability 0.99 --random-questions 0.7 \
        --eval-every 450 --final-count 300

These two commands made the shipped ``model/`` in 44.0 minutes of 2 cores (the second's ``--minutes``
is 44.5 less the first's measured minutes, so that the whole stays within 45). ``model/REPORT.md``
gives the measured times and numbers; the world's current ``PAIR_PROBABILITY`` 0.99, faint
visibility 0.02-0.10 and 70% random question negatives are the last phase's.

Training runs in three phases over one global step counter (``--vision-steps``, ``--text-steps``,
then ``--steps`` of the joint phase), all recorded in the report:

1. **vision**: the vision tower alone learns what is in each cell of the 3x3 grid (category and
   colour, or empty) through a training-only head on its patches (``CellHead``). A small LVLM trained
   from scratch otherwise sits on a long plateau describing the prior before it learns to look.
2. **text**: the language model alone learns to caption without any image (the prompt with the image
   removed, as the image-free stream of PAI's guidance or VHR's probe builds it), so the
   co-occurrence of anchors and partners becomes a language prior.
3. **joint**: the whole model on images: ``CAPTION_SHARE`` of the examples are captions ("Describe
   the image." and variants), the others POPE-style yes/no questions with random, popular and
   adversarial negatives, ``--questions-per-example`` of them per example, one per turn;
   ``IMAGE_DROP`` of the caption examples drop their image, so the image-free branch stays a trained
   prior. The cell head's loss goes on at ``--cell-weight``.

The language-model loss is on the answer tokens only (every answer of a multi-turn example). Every
step draws a fresh batch of training scenes. Held-out metrics are printed periodically; the final
evaluation is written to
``report.json`` and ``REPORT.md`` beside the weights (fp16 safetensors, loaded back in fp32 by
``from_pretrained``). Training stops at the last step or after ``--minutes``, whichever
comes first. ``--init DIR --first-step N --steps M`` continues a saved model with a further joint
phase of ``M`` steps from global step ``N`` (its own warmup and cosine schedule; the report then sums
both runs' minutes and keeps both histories and phase lists).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
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
TEXT_ONLY_TEMPLATE = "USER: {text} ASSISTANT:"  # the prompt template with the image removed

CAPTION_SHARE = 0.35  # of joint-phase examples; the rest are yes/no questions
IMAGE_DROP = 0.12  # of joint-phase caption examples: captioned without their image
# negatives of yes/no questions: popular and adversarial negatives are each scene's top absent
# categories, a narrow set; random ones cover every category, so most questions draw them (with a
# third each, the first model said yes to 43% of random absent categories)
QUESTION_KINDS = {"random": 0.7, "popular": 0.15, "adversarial": 0.15}
# training-only negatives among the absent shapes closest to a drawn one (``--lookalike-questions``):
# a model that answers from a coarse shape feature says "yes" to a pentagon beside a hexagon
LOOKALIKE_TOP = 3
# yes/no questions per question example, one per turn: a batch is padded to its longest caption (up
# to about 97 tokens with the image's 36), and three questions (96 on average) fit where one (57) did
QUESTIONS_PER_EXAMPLE = 3
LR_FLOOR = 0.05  # each phase's cosine decays to this fraction of its peak rate (``--lr-floor``)


def lookalike_question(scene: world.Scene, rng: np.random.Generator, similarity) -> dict:
    """A yes/no question whose negative looks like a drawn object: one of the ``LOOKALIKE_TOP``
    absent categories closest in shape to a present one (``world.shape_similarity``); a positive
    or such a negative, equally likely."""
    present = scene.categories
    if rng.random() < 0.5:
        category, label = world.pick(rng, present), "yes"
    else:
        absent = [c for c in world.CATEGORIES if c not in present]
        closest = sorted(absent, key=lambda c: -max(similarity[p][c] for p in present))[:LOOKALIKE_TOP]
        category, label = world.pick(rng, closest), "no"
    return {"image_id": scene.image_id, "category": category, "text": world.question(category), "label": label}


def draw_question(scene: world.Scene, rng: np.random.Generator, popularity, cooc, similarity=None) -> dict:
    """One yes/no question about ``scene``, its negative kind drawn from ``QUESTION_KINDS``."""
    kind = world.pick(rng, list(QUESTION_KINDS), p=list(QUESTION_KINDS.values()))
    if kind == "lookalike":
        return lookalike_question(scene, rng, similarity)
    return world.pick(rng, world.pope_questions(scene, kind, rng, per_side=1, popularity=popularity, cooc=cooc))


def make_example(
    scene: world.Scene,
    rng: np.random.Generator,
    popularity,
    cooc,
    caption_share: float = CAPTION_SHARE,
    similarity=None,
    questions: int = QUESTIONS_PER_EXAMPLE,
) -> tuple[list[tuple[str, str]], bool]:
    """The turns (prompt text, answer) of one example about ``scene``, and whether it is a caption.

    A caption example is one turn; a question example asks up to ``questions`` yes/no questions
    about different categories, one per turn, as multi-turn visual question answering data does."""
    if rng.random() < caption_share:
        return [(world.pick(rng, CAPTION_PROMPTS), scene.caption)], True
    turns, asked = [], set()
    for _ in range(2 * questions):  # a few extra draws, so repeated categories are rarely short
        q = draw_question(scene, rng, popularity, cooc, similarity)
        if q["category"] not in asked:
            asked.add(q["category"])
            turns.append((q["text"] + world.pick(rng, QUESTION_SUFFIXES), q["label"]))
        if len(turns) == questions:
            break
    return turns, False


def conversation(turns: list[tuple[str, str]], image: bool) -> str:
    """The chat-template text of ``turns``, the first with the image (or the image-free template)."""
    first = (PROMPT_TEMPLATE if image else TEXT_ONLY_TEMPLATE).format(text=turns[0][0])
    text = first + " " + turns[0][1] + "</s>"
    return text + "".join(f"USER: {prompt} ASSISTANT: {answer}</s>" for prompt, answer in turns[1:])


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, assistant: int, eos: int) -> torch.Tensor:
    """Labels that keep only the answers: the tokens after each "assistant :" up to its ``</s>``."""
    labels = torch.full_like(input_ids, -100)
    for row in range(input_ids.shape[0]):
        ids = input_ids[row].tolist()
        for start in (i + 2 for i, t in enumerate(ids) if t == assistant):
            end = next((i for i in range(start, len(ids)) if ids[i] == eos), len(ids) - 1)
            labels[row, start : end + 1] = input_ids[row, start : end + 1]
    labels[attention_mask == 0] = -100
    return labels


def make_batch(
    processor,
    scenes: list[world.Scene],
    rng,
    popularity,
    cooc,
    caption_share: float = CAPTION_SHARE,
    image_drop: float = IMAGE_DROP,
    similarity=None,
    questions: int = QUESTIONS_PER_EXAMPLE,
) -> tuple[dict, list[world.Scene]]:
    """A right-padded batch with answer-only labels, and the scenes whose images it carries.

    ``caption_share`` 1 and ``image_drop`` 1 give the text-only phase's batches."""
    texts, imaged = [], []
    for scene in scenes:
        turns, is_caption = make_example(scene, rng, popularity, cooc, caption_share, similarity, questions)
        image = not (is_caption and rng.random() < image_drop)
        texts.append(conversation(turns, image))
        if image:
            imaged.append(scene)
    if imaged:
        enc = processor(images=[s.render() for s in imaged], text=texts, return_tensors="pt", padding=True)
    else:
        enc = processor.tokenizer(texts, return_tensors="pt", padding=True)
    tok = processor.tokenizer
    enc["labels"] = answer_labels(
        enc["input_ids"], enc["attention_mask"], tok.convert_tokens_to_ids("assistant"), tok.eos_token_id
    )
    return enc, imaged


class CellHead(torch.nn.Module):
    """Training-only auxiliary head: what is in each grid cell, read from the vision tower's patches.

    Each cell of the 3x3 grid covers 3x3 patches; their mean goes through two linear layers, one over
    the categories plus "empty", one over the colours plus "none", trained with cross-entropy against
    the drawn objects. Cells holding a faint object are left out of the loss: a head trained to
    report them makes a detector far better than the captions alone would (the first candidate found
    94% of faint partners). It gives the vision tower a direct signal; it is not part of the saved
    model.
    """

    def __init__(self, model):
        super().__init__()
        hidden = model.config.vision_config.hidden_size
        self.category = torch.nn.Linear(hidden, len(world.CATEGORIES) + 1)
        self.color = torch.nn.Linear(hidden, len(world.COLORS) + 1)
        self.side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        self.features = None
        self.handle = model.model.vision_tower.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output.last_hidden_state[:, 1:]  # patches, without the class token

    def loss(self, scenes: list[world.Scene]) -> torch.Tensor:
        """Cross-entropy of each cell's category and colour against ``scenes`` (faint objects left out)."""
        b, _, h = self.features.shape
        per = self.side // world.GRID
        f = self.features.reshape(b, world.GRID, per, world.GRID, per, h).mean(dim=(2, 4)).reshape(b, world.CELLS, h)
        category = torch.full((b, world.CELLS), len(world.CATEGORIES), dtype=torch.long)
        color = torch.full((b, world.CELLS), len(world.COLORS), dtype=torch.long)
        colors = list(world.COLORS)
        for row, scene in enumerate(scenes):
            for obj in scene.objects:
                if obj.faint:  # not supervised: faint objects are learnt from the captions alone
                    category[row, obj.cell] = color[row, obj.cell] = -100
                else:
                    category[row, obj.cell] = world.CATEGORIES.index(obj.category)
                    color[row, obj.cell] = colors.index(obj.color)
        ce = torch.nn.functional.cross_entropy
        return ce(self.category(f).flatten(0, 1), category.flatten()) + ce(self.color(f).flatten(0, 1), color.flatten())


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = LR_FLOOR) -> float:
    """Linear warmup to ``peak``, then a cosine decay to ``floor * peak`` at the phase's last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def summary(metrics: dict) -> str:
    """One line of the held-out metrics: recall and CHAIR_i, the partner rates and POPE accuracies."""
    return (
        f"recall {metrics['test']['recall']:.1f}  chair_i {metrics['test']['chair_i']:.1f}  "
        f"misleading chair_i {metrics['misleading']['chair_i']:.1f} "
        f"(partner {metrics['misleading']['partner_named']:.0f}%)  "
        f"faint partner {metrics['faint']['partner_named']:.0f}%  "
        f"pope acc r/p/a {metrics['pope_random']['accuracy']:.1f}/{metrics['pope_popular']['accuracy']:.1f}/"
        f"{metrics['pope_adversarial']['accuracy']:.1f}"
    )


def write_report(out: Path, report: dict) -> None:
    """Write ``report`` to ``report.json`` and its readable summary to ``REPORT.md`` in ``out``."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["final"]
    lines = [
        "# halluguard test model: training report",
        "",
        f"LLaVA architecture, {report['parameters'] / 1e6:.2f}M parameters, {report['weights_mb']:.1f} MB of fp16 "
        f"safetensors; trained from scratch for {report['steps']} steps (batch {report['batch_size']}, seed "
        f"{report['seed']}) in {report['train_minutes']:.1f} minutes on {report['machine']}"
        + f" ({report['train_cpu_minutes']:.1f} CPU minutes), in phases: "
        + "; ".join(
            f"{p['phase']} steps {p['first_step']}-{p['first_step'] + p['steps']} "
            f"({p['minutes']:.1f} min, {p['cpu_minutes']:.1f} CPU min)"
            for p in report["phases"]
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
                ("faint", "faint (A with a faint B)"),
            )
        ),
        "",
        f"The partner B is named in {m['misleading']['partner_named']:.1f}% of misleading captions (where it is "
        f"absent) and in {m['faint']['partner_named']:.1f}% of faint captions (where it is drawn faint).",
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


def measure_speed(model, processor, threads: int) -> dict:
    """Greedy caption tokens per second (batch 1, up to 64 new tokens) over 20 test scenes."""
    from .evaluate import CAPTION_PROMPT, generate_texts

    scene_list = list(world.scenes("test", 20, 0, start=10_000))
    t0 = time.perf_counter()
    tokens = 0
    for s in scene_list:
        text = generate_texts(model, processor, [s.render()], [CAPTION_PROMPT], 64)[0]
        tokens += len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "threads": threads}


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the output folder, the phases' lengths and learning rates, the evaluations, the seed and
    the threads."""
    parser.add_argument("--out", default=str(Path(__file__).parent / "model"), help="output folder")
    parser.add_argument("--vision-steps", type=int, default=500, help="phase 1: vision tower and cell head alone")
    parser.add_argument("--text-steps", type=int, default=300, help="phase 2: text-only captions")
    parser.add_argument("--steps", type=int, default=3000, help="phase 3: the whole model on images")
    parser.add_argument("--minutes", type=float, default=45.0, help="stop training after this long, whatever the step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of each phase")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--lr-floor",
        type=float,
        default=LR_FLOOR,
        help="each phase's cosine decays to this fraction of --lr (1 keeps the rate constant after warmup)",
    )
    parser.add_argument("--cell-weight", type=float, default=0.5, help="weight of the cell head in the joint phase")
    parser.add_argument("--eval-every", type=int, default=600)
    parser.add_argument("--eval-count", type=int, default=50, help="scenes per split in periodic evaluations")
    parser.add_argument("--final-count", type=int, default=500, help="scenes per split in the final evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the joint phase's example mix, of a continued run (``--init``) and of the world's
    training-time overrides."""
    parser.add_argument(
        "--questions-per-example",
        type=int,
        default=QUESTIONS_PER_EXAMPLE,
        help="yes/no questions per question example, one per turn",
    )
    parser.add_argument("--caption-share", type=float, default=CAPTION_SHARE, help="share of caption examples")
    parser.add_argument("--image-drop", type=float, default=IMAGE_DROP, help="share of captions without image")
    parser.add_argument(
        "--init", default=None, help="continue from the model (and report) in this folder: one more joint phase"
    )
    parser.add_argument("--first-step", type=int, default=0, help="global index of this run's first step, with --init")
    parser.add_argument(
        "--pair-probability",
        type=float,
        default=None,
        help="train with partners drawn beside their anchor at this rate instead of the world's (recorded)",
    )
    parser.add_argument(
        "--random-questions",
        type=float,
        default=None,
        help="share of yes/no questions with random negatives (the rest popular and adversarial, halved; recorded)",
    )
    parser.add_argument(
        "--lookalike-questions",
        type=float,
        default=None,
        help="share of yes/no questions with a negative shaped like a drawn object, from the random share (recorded)",
    )
    parser.add_argument(
        "--faint-visibility",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="train on faint partners drawn at this visibility range instead of the world's (recorded)",
    )


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser (its help is this module's docstring) and the parsed, checked arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_schedule_arguments(parser)
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.lr_floor <= 1:
        parser.error("--lr-floor must be between 0 and 1")
    return parser, args


def apply_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set torch's threads and the overrides of the world and the question mix the arguments ask for:
    ``--random-questions q`` gives random ``q`` and popular and adversarial ``(1 - q) / 2`` each;
    ``--lookalike-questions l`` takes ``l`` from the random share (an error when ``l`` exceeds it)."""
    torch.set_num_threads(args.threads)
    if args.faint_visibility:
        world.VISIBILITY["faint"] = tuple(args.faint_visibility)
    if args.pair_probability is not None:
        world.PAIR_PROBABILITY = args.pair_probability
    if args.random_questions is not None:
        rest = (1 - args.random_questions) / 2
        QUESTION_KINDS.update(random=args.random_questions, popular=rest, adversarial=rest)
    if args.lookalike_questions is not None:
        pool = QUESTION_KINDS["random"] + QUESTION_KINDS.get("lookalike", 0.0)
        if not 0 <= args.lookalike_questions <= pool:
            parser.error(f"--lookalike-questions must be between 0 and the random share ({pool:g})")
        QUESTION_KINDS.update(random=pool - args.lookalike_questions, lookalike=args.lookalike_questions)


@dataclasses.dataclass
class Training:
    """What the training loop works with and what it records: the model, its cell head and optimizer,
    the processors and data sources, each phase's global step range ``[first, end)``, the report of the
    run continued (``--init``), and the losses, held-out history and finished phases so far."""

    args: argparse.Namespace
    model: torch.nn.Module
    cells: CellHead
    params: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    processor: object  # evaluation and saving
    train_processor: object  # right padding, for training batches
    popularity: object
    cooc: object
    similarity: object
    rng: np.random.Generator
    bounds: dict[str, tuple[int, int]]
    previous: dict | None
    previous_minutes: float  # wall-clock and CPU minutes of the run continued (0 for a run from scratch)
    previous_cpu_minutes: float
    history: list[dict] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    phases: list[dict] = dataclasses.field(default_factory=list)
    start: float = 0.0  # wall-clock and CPU clocks at the first step
    cpu_start: float = 0.0
    phase_start: tuple[float, float, int] = (0.0, 0.0, 0)  # clocks and first step of the current phase


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict | None]:
    """The model to train: a fresh one from ``--seed``, or with ``--init`` the saved model (in float32)
    and the report beside it (None when there is none)."""
    if not args.init:
        return build_model(args.seed), None
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    report_file = Path(args.init) / "report.json"
    return model, json.loads(report_file.read_text()) if report_file.exists() else None


def make_optimizer(model: torch.nn.Module, cells: CellHead, lr: float) -> tuple[list, torch.optim.Optimizer]:
    """The named parameters of the model and the cell head, and AdamW over them (betas 0.9, 0.98),
    weight decay 0.01 on matrices and none on vectors."""
    params = list(model.named_parameters()) + list(cells.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    return params, optimizer


def phase_bounds(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """Each phase's global step range ``[first, end)``: vision, text then joint one after the other,
    or with ``--init`` a single joint phase of ``--steps`` from ``--first-step``."""
    if args.init:  # a further joint phase, with its own learning-rate schedule
        return {"joint": (args.first_step, args.first_step + args.steps)}
    vision, text = args.vision_steps, args.vision_steps + args.text_steps
    return {"vision": (0, vision), "text": (vision, text), "joint": (text, text + args.steps)}


def prepare(args: argparse.Namespace) -> Training:
    """The processors, the model with its cell head and optimizer, the world's statistics and the
    example generator (seeded by ``--seed`` and ``--first-step``), ready for ``train``."""
    processor = build_processor()
    train_processor = build_processor()
    train_processor.tokenizer.padding_side = "right"
    model, previous = load_model(args)
    cells = CellHead(model)
    params, optimizer = make_optimizer(model, cells, args.lr)
    popularity, cooc = world.category_frequencies(seed=args.seed), world.cooccurrence(seed=args.seed)
    similarity = world.shape_similarity()
    rng = np.random.default_rng([args.seed, 99, args.first_step])
    return Training(
        args=args,
        model=model,
        cells=cells,
        params=params,
        optimizer=optimizer,
        processor=processor,
        train_processor=train_processor,
        popularity=popularity,
        cooc=cooc,
        similarity=similarity,
        rng=rng,
        bounds=phase_bounds(args),
        previous=previous,
        previous_minutes=previous["train_minutes"] if previous else 0.0,
        previous_cpu_minutes=previous.get("train_cpu_minutes", 0.0) if previous else 0.0,
    )


def phase_loss(run: Training, phase: str, scenes: list[world.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to minimise and the loss to report on a batch of ``scenes``. vision: the cell head's
    loss, both. text (captions without images) and joint: the language-model loss ``L`` on the answers,
    and ``L + cell_weight * cell loss`` of the scenes whose image the batch carries."""
    if phase == "vision":
        pixels = run.train_processor.image_processor([s.render() for s in scenes], return_tensors="pt")
        run.model.model.vision_tower(pixels["pixel_values"])
        loss = run.cells.loss(scenes)
        return loss, loss
    args, text = run.args, phase == "text"
    batch, imaged = make_batch(
        run.train_processor,
        scenes,
        run.rng,
        run.popularity,
        run.cooc,
        1.0 if text else args.caption_share,
        1.0 if text else args.image_drop,
        run.similarity,
        args.questions_per_example,
    )
    lm_loss = run.model(**batch).loss
    return lm_loss + (args.cell_weight * run.cells.loss(imaged) if imaged else 0.0), lm_loss


def train_step(run: Training, at: int, phase: str) -> float:
    """One optimizer step at global step ``at``: the phase's learning rate (``lr_at`` from the phase's
    first step), a fresh batch of training scenes, the phase's loss, gradients clipped to norm 1.
    Returns the reported loss."""
    args = run.args
    first, end = run.bounds[phase]
    run.model.train()
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(at - first, end - first, args.lr, args.warmup, args.lr_floor)
    batch_scenes = list(world.scenes("train", args.batch_size, args.seed, start=at * args.batch_size))
    loss, lm_loss = phase_loss(run, phase, batch_scenes)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in run.params], 1.0)
    run.optimizer.step()
    return lm_loss.item()


def joint_mix(args: argparse.Namespace) -> dict:
    """The joint phase's example mix, recorded with it."""
    return {
        "caption_share": args.caption_share,
        "image_drop": args.image_drop,
        "cell_weight": args.cell_weight,
        "question_kinds": dict(QUESTION_KINDS),
        "questions_per_example": args.questions_per_example,
    }


def record_phase(run: Training, phase: str, at: int) -> None:
    """Close ``phase`` after step ``at``: record its steps, rate, minutes and world settings, print the
    record and start the next phase's clocks."""
    wall, cpu, begin = run.phase_start
    run.phases.append(
        {
            "phase": phase,
            "first_step": begin,
            "steps": at + 1 - begin,
            "lr": run.args.lr,
            "lr_floor": run.args.lr_floor,
            "minutes": (time.perf_counter() - wall) / 60,
            "cpu_minutes": (time.process_time() - cpu) / 60,
            "faint_visibility": list(world.VISIBILITY["faint"]),
            "pair_probability": world.PAIR_PROBABILITY,
            **(joint_mix(run.args) if phase == "joint" else {}),
        }
    )
    tqdm.write(f"phase {phase} done at step {at + 1}: {run.phases[-1]}")
    run.phase_start = (time.perf_counter(), time.process_time(), at + 1)


def record_evaluation(run: Training, at: int, minutes: float) -> None:
    """A periodic held-out evaluation (``--eval-count`` scenes per split) after step ``at``, added to
    the history with the mean loss of the last 50 steps, and printed."""
    count = run.args.eval_count
    metrics = evaluate(run.model, run.processor, count=count, pope_images=count // 2, seed=run.args.seed)
    run.history.append(
        {
            "step": at + 1,
            "minutes": minutes + run.previous_minutes,
            "loss": float(np.mean(run.losses[-50:])),
            "summary": summary(metrics),
        }
    )
    tqdm.write(f"step {at + 1} ({minutes:.1f} min): {run.history[-1]['summary']}")


def train(run: Training) -> int:
    """Train from ``--first-step`` through the phases until the last step, or the first step that ends
    past ``--minutes``; closes each phase at its end and evaluates every ``--eval-every`` joint steps
    (not at the last). Returns the global index of the last step taken."""
    args = run.args
    total = run.bounds["joint"][1]
    run.start, run.cpu_start = time.perf_counter(), time.process_time()
    run.phase_start = (run.start, run.cpu_start, args.first_step)
    bar = tqdm(range(args.first_step, total), desc="training", unit="step")
    at = args.first_step
    for at in bar:
        phase = next(name for name, (first, end) in run.bounds.items() if first <= at < end)
        first, last_of_phase = run.bounds[phase]
        run.losses.append(train_step(run, at, phase))
        bar.set_postfix(phase=phase, loss=f"{np.mean(run.losses[-20:]):.3f}")
        minutes = (time.perf_counter() - run.start) / 60
        last = at + 1 == total or minutes >= args.minutes
        if at + 1 == last_of_phase or last:
            record_phase(run, phase, at)
        if phase == "joint" and (at + 1 - first) % args.eval_every == 0 and not last:
            record_evaluation(run, at, minutes)
        if last:
            break
    return at


def final_evaluation(run: Training, steps: int, train_minutes: float) -> dict:
    """The final held-out evaluation (``--final-count`` scenes per split) of the model without its cell
    head, added to the history and printed."""
    count = run.args.final_count
    run.cells.handle.remove()
    run.model.eval()
    final = evaluate(run.model, run.processor, count=count, pope_images=count // 2, seed=run.args.seed)
    run.history.append(
        {"step": steps, "minutes": train_minutes, "loss": float(np.mean(run.losses[-50:])), "summary": summary(final)}
    )
    print("final:", summary(final))
    return final


def save_model(run: Training, out: Path) -> float:
    """Save the model in float16 and the processor to ``out``; returns the weights' size in MB."""
    run.model.to(torch.float16).save_pretrained(out)
    run.processor.save_pretrained(out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20


def joined_history(previous: dict | None, history: list[dict]) -> list[dict]:
    """This run's history after the continued run's, whose final entry is marked "(end of run)"."""
    if not previous:
        return history
    ended = [dict(h, summary="(end of run) " + h["summary"]) for h in previous["history"][-1:]]
    return previous["history"][:-1] + ended + history


def build_report(run: Training, steps: int, final: dict, speed: dict, weights_mb: float, minutes: tuple) -> dict:
    """The report: size, schedule, wall-clock and CPU minutes ``minutes`` (including the continued
    run's), peak memory, the final evaluation, the history, generation speed and the phases."""
    args = run.args
    train_minutes, train_cpu_minutes = minutes
    return {
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "weights_mb": weights_mb,
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_minutes": train_minutes,
        "train_cpu_minutes": train_cpu_minutes,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": f"{platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "final": final,
        "history": joined_history(run.previous, run.history),
        "speed": speed,
        "phases": (run.previous or {}).get("phases", []) + run.phases,
    }


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate and save the test model as the command line asks (see the module docstring)."""
    parser, args = parse_args(argv)
    apply_overrides(parser, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = prepare(args)
    at = train(run)
    train_minutes = (time.perf_counter() - run.start) / 60 + run.previous_minutes
    train_cpu_minutes = (time.process_time() - run.cpu_start) / 60 + run.previous_cpu_minutes
    final = final_evaluation(run, at + 1, train_minutes)
    speed = measure_speed(run.model, run.processor, args.threads)
    weights_mb = save_model(run, out)
    report = build_report(run, at + 1, final, speed, weights_mb, (train_minutes, train_cpu_minutes))
    write_report(out, report)
    print(f"saved to {out} ({weights_mb:.1f} MB)")


if __name__ == "__main__":
    main()
