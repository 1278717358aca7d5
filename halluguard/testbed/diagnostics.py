"""Diagnostics of the test model: where its partner hallucinations come from.

    python -m halluguard.testbed.diagnostics                 # the shipped model, 100 scenes per split
    python -m halluguard.testbed.diagnostics --write-report  # ... and put the results into REPORT.md
    python -m halluguard.testbed.diagnostics --model DIR --world OTHER/world.py --json out.json

``--model`` and ``--world`` point at any model folder and world module (for instance an earlier model
and the world it was trained on), so the same measurements compare two models.

On ``misleading`` scenes (an anchor ``A`` drawn without its partner ``B``):

1. **p(partner)**: teacher-forced on the true caption up to the colour of the object named right
   after the anchor (``"... a red moon at the top left, a blue"``), the probability that the next
   word is ``B``, with the real image, a grey image, no image at all (the image tokens removed, as
   the image-free streams of PAI and VHR build the prompt), the image with ``B`` drawn clearly in
   place of that next object, and the image with ``A`` erased while the text still names it. A
   language prior shows as a high image-free p(partner) that the real image lowers but does not
   remove; an image-driven hallucination shows as a real-image p(partner) far above the image-free
   one that falls when the anchor is erased.
2. **image attention**: the share of attention the text model puts on the image tokens when it
   predicts each object word of its own greedy caption (mean over layers and heads), for true
   objects by their place in the caption and for hallucinated partners.
3. **image-minus-prior contrast**: ``log p(word | image) - log p(word | no image)`` on the model's own
   captions, at hallucinated partners (misleading scenes) and at partners that are drawn and named
   (``faint`` scenes, and the partners of ``test`` scenes). Contrastive methods need it negative or
   small on the first and positive on the second.
4. **attention saturation**: over (layer, head, caption step), the share that puts less than 1% or
   more than 99% of its attention on the image, and the number of heads that always do.
5. **faint detection** (worlds with a ``faint`` split): how often captions name a faint partner when
   it is drawn at each of several visibility ranges (``FAINT_SWEEP``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .. import compat
from .evaluate import CAPTION_PROMPT
from .model import PROMPT_TEMPLATE

MARK_BEGIN = "<!-- diagnostics: begin -->"
MARK_END = "<!-- diagnostics: end -->"


def load_world(path: str | None):
    if path is None:
        from . import world

        return world
    spec = importlib.util.spec_from_file_location("halluguard_world_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def load_model(folder: str | None):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import path

    folder = folder or str(path())
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def clear(world, obj, **changes):
    """``obj`` drawn clearly (whatever visibility fields the world's objects have), with ``changes``."""
    fields = {f.name for f in dataclasses.fields(obj)}
    for name, value in (("visibility", 1.0), ("faint", False), ("hidden", False)):
        if name in fields:
            changes.setdefault(name, value)
    return dataclasses.replace(obj, **changes)


def ordered_objects(world, scene) -> list:
    """The scene's objects in the order its caption names them."""
    by_phrase = {o.phrase: o for o in scene.objects}
    text = scene.caption.rstrip(".")
    head, _, last = text.rpartition(" and ")
    phrases = (head.split(", ") if head else []) + [last]
    return [by_phrase[p] for p in phrases]


@contextlib.contextmanager
def attention_maps(model, wanted: bool):
    """Eager attention for one offline forward whose whole attention maps are measured (saturation,
    fading over every caption step); the model's own implementation otherwise and afterwards."""
    if not wanted:
        yield
        return
    before = compat.text_attn_implementation(model.config.text_config)
    model.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": before})


class Scorer:
    """Teacher-forced forwards of (image or none, prompt, answer prefix) rows, batched."""

    def __init__(self, model, processor, batch_size: int = 32):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.tokenizer = processor.tokenizer
        self.image_id = model.config.image_token_id

    def encode(self, images: list, prefixes: list[str], with_image: bool = True) -> dict:
        template = PROMPT_TEMPLATE if with_image else PROMPT_TEMPLATE.replace("<image>", "")
        texts = [template.format(text=CAPTION_PROMPT) + " " + p for p in prefixes]
        if with_image:
            return self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        return self.tokenizer(texts, return_tensors="pt", padding=True)

    @torch.no_grad()
    def next_log_probs(self, images, prefixes, with_image=True) -> torch.Tensor:
        """(N, V) log-probabilities of the word after each prefix."""
        out = []
        for i in range(0, len(prefixes), self.batch_size):
            enc = self.encode(images[i : i + self.batch_size], prefixes[i : i + self.batch_size], with_image)
            logits = self.model(**enc).logits[:, -1]
            out.append(torch.log_softmax(logits.float(), -1))
        return torch.cat(out)

    @torch.no_grad()
    def caption_steps(self, images, captions, with_image=True, attentions=False) -> list[dict]:
        """Per caption: its words, the log-probability of each, and (with ``attentions``) the share of
        attention on the image tokens at the step that predicts each word, as (L, H, words)."""
        rows = []
        for i in range(0, len(captions), self.batch_size):
            batch_caps = captions[i : i + self.batch_size]
            enc = self.encode(images[i : i + self.batch_size], batch_caps, with_image)
            prompt = self.encode(images[i : i + self.batch_size], [""] * len(batch_caps), with_image)
            with attention_maps(self.model, attentions):
                out = self.model(**enc, output_attentions=attentions)
            logp = torch.log_softmax(out.logits.float(), -1)
            ids = enc["input_ids"]
            width = ids.shape[1]
            for row, _ in enumerate(batch_caps):
                n_prompt = int(prompt["attention_mask"][row].sum())
                n_all = int(enc["attention_mask"][row].sum())
                positions = list(range(width - n_all + n_prompt, width))  # left padding: answer at the end
                words = self.tokenizer.convert_ids_to_tokens(ids[row, positions].tolist())
                steps = [p - 1 for p in positions]  # the step that predicts each word
                entry = {"words": words, "logp": [float(logp[row, s, ids[row, p]]) for s, p in zip(steps, positions)]}
                if attentions:
                    image = (ids[row] == self.image_id).float()
                    layers = torch.stack([a[row, :, steps] for a in out.attentions])  # (L, H, words, T)
                    entry["image_mass"] = (layers * image).sum(-1).numpy()  # (L, H, words)
                rows.append(entry)
        return rows


def object_slots(world, words: list[str]) -> list[tuple[int, str]]:
    """(word index, category) for each object word of a caption."""
    synonyms = {s: c for c, syns in world.SYNONYMS.items() for s in syns}
    return [(i, synonyms[w]) for i, w in enumerate(words) if w in synonyms]


def greedy_captions(model, processor, images, max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    from .evaluate import generate_texts

    return generate_texts(model, processor, images, [CAPTION_PROMPT] * len(images), max_new_tokens, batch_size)


def p_partner(world, scorer: Scorer, scenes: list) -> dict:
    """Mean p(partner) at the category word of the object named right after the anchor."""
    rows = []
    for scene in scenes:
        listed = ordered_objects(world, scene)
        anchor = next(o for o in listed if o.category in world.PAIRS)
        k = listed.index(anchor)
        if k + 1 >= len(listed):
            continue
        nxt = listed[k + 1]
        caption = scene.caption
        cut = caption.index(nxt.phrase) + len(nxt.phrase.split(" ")[0]) + 1 + len(nxt.color)
        prefix = caption[:cut]
        partner = world.PAIRS[anchor.category]
        drawn = [o if o is not nxt else clear(world, o, category=partner) for o in scene.objects]
        erased = [o for o in scene.objects if o is not anchor]
        rows.append(
            {
                "prefix": prefix,
                "partner": partner,
                "real": scene.render(),
                "partner_drawn": world.render(dataclasses.replace(scene, objects=drawn)),
                "anchor_erased": world.render(dataclasses.replace(scene, objects=erased)),
            }
        )
    size = rows[0]["real"].size
    grey = torch.full((size[1], size[0], 3), 128, dtype=torch.uint8).numpy()
    from PIL import Image

    grey_image = Image.fromarray(grey, "RGB")
    prefixes = [r["prefix"] for r in rows]
    ids = torch.tensor([scorer.tokenizer.convert_tokens_to_ids(r["partner"]) for r in rows])
    result = {"n": len(rows)}
    for name, images, with_image in (
        ("real", [r["real"] for r in rows], True),
        ("grey", [grey_image] * len(rows), True),
        ("image_free", [None] * len(rows), False),
        ("partner_drawn", [r["partner_drawn"] for r in rows], True),
        ("anchor_erased", [r["anchor_erased"] for r in rows], True),
    ):
        logp = scorer.next_log_probs(images, prefixes, with_image)
        result[name] = float(logp.gather(1, ids[:, None]).exp().mean())
    return result


def caption_analysis(world, scorer: Scorer, model, processor, count: int, seed: int) -> dict:
    """Attention on the image at object words, the image-minus-prior contrast, saturation."""
    partners = set(world.PAIRS.values())
    mass_true: dict[int, list[float]] = {}
    mass_partner: list[float] = []
    mass_partner_place: list[int] = []
    contrast = {"hallucinated_partner": [], "drawn_partner_named": [], "other_true_object": []}
    saturated, total, head_means = 0, 0, []
    splits = [s for s in ("misleading", "faint", "test") if s in world.SPLIT_SEEDS]
    for split in splits:
        scenes = list(world.scenes(split, count, seed))
        images = [s.render() for s in scenes]
        captions = greedy_captions(model, processor, images)
        with_image = scorer.caption_steps(images, captions, True, attentions=True)
        without = scorer.caption_steps([None] * len(scenes), captions, False)
        for scene, a, b in zip(scenes, with_image, without):
            present = set(scene.categories)
            mass = a["image_mass"]  # (L, H, words)
            flat = mass.reshape(-1, mass.shape[-1])
            saturated += int(((flat < 0.01) | (flat > 0.99)).sum())
            total += flat.size
            head_means.append(mass.mean(-1))
            for place, (i, category) in enumerate(object_slots(world, a["words"])):
                m = float(mass[:, :, i].mean())
                diff = a["logp"][i] - b["logp"][i]
                if category in present:
                    if split == "misleading" or category not in partners:
                        mass_true.setdefault(min(place, 4), []).append(m)
                    if category in partners and any(world.PAIRS[x] == category for x in present if x in world.PAIRS):
                        contrast["drawn_partner_named"].append(diff)
                    elif split == "misleading":
                        contrast["other_true_object"].append(diff)
                elif split == "misleading" and category in partners:
                    mass_partner.append(m)
                    mass_partner_place.append(place)
                    contrast["hallucinated_partner"].append(diff)
    heads = np.stack(head_means).mean(0)  # (L, H)
    return {
        "image_mass_true_by_place": {
            str(k + 1) + ("+" if k == 4 else ""): [float(np.mean(v)), len(v)] for k, v in sorted(mass_true.items())
        },
        "image_mass_hallucinated_partner": [float(np.mean(mass_partner)) if mass_partner else None, len(mass_partner)],
        "hallucinated_partner_mean_place": float(np.mean(mass_partner_place)) + 1 if mass_partner_place else None,
        "contrast": {k: [float(np.mean(v)) if v else None, len(v)] for k, v in contrast.items()},
        "saturated_share": saturated / max(total, 1),
        "heads_always_on_image": int((heads > 0.99).sum()),
        "heads_never_on_image": int((heads < 0.01).sum()),
        "heads": int(heads.size),
        "head_image_mass": heads.round(3).tolist(),
    }


FAINT_SWEEP = ((0.3, 0.45), (0.11, 0.14), (0.07, 0.11), (0.04, 0.07), (0.02, 0.04))


def faint_detection(world, model, processor, count: int, seed: int, ranges=FAINT_SWEEP) -> dict:
    """Percent of ``faint``-split captions that name the partner, with faint partners drawn at each
    visibility range (worlds with a ``faint`` split and ``VISIBILITY`` levels only)."""
    saved = world.VISIBILITY["faint"]
    out = {}
    try:
        for lo, hi in ranges:
            world.VISIBILITY["faint"] = (lo, hi)
            scenes = list(world.scenes("faint", count, seed))
            captions = greedy_captions(model, processor, [s.render() for s in scenes])
            out[f"{lo:g}-{hi:g}"] = partner_named(world, scenes, captions)
    finally:
        world.VISIBILITY["faint"] = saved
    return out


def partner_named(world, scenes, captions) -> float:
    """Percent of captions that name the partner of the scene's anchor."""
    from .evaluate import partner_named as named

    return named(scenes, captions, world)


def run(model_dir: str | None = None, world_path: str | None = None, count: int = 100, seed: int = 0) -> dict:
    world = load_world(world_path)
    model, processor = load_model(model_dir)
    scorer = Scorer(model, processor)
    misleading = list(world.scenes("misleading", count, seed))
    results = {
        "model": str(model_dir or "shipped"),
        "count": count,
        "p_partner": p_partner(world, scorer, misleading),
        **caption_analysis(world, scorer, model, processor, count, seed),
    }
    if "faint" in getattr(world, "SPLIT_SEEDS", {}) and hasattr(world, "VISIBILITY"):
        results["faint_partner_named"] = faint_detection(world, model, processor, count, seed)
    return results


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(results: list[tuple[str, dict]]) -> str:
    """A report section comparing models (columns)."""
    names = [n for n, _ in results]
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    lines = [
        "## Diagnostics",
        "",
        f"`python -m halluguard.testbed.diagnostics --write-report` ({results[0][1]['count']} scenes per split; "
        "see the module's docstring for what each line measures).",
        "",
        "p(partner) at the word after the colour of the object named right after the anchor, misleading "
        "scenes, teacher-forced on the true caption:",
        "",
        head,
        *_partner_rows(results),
        "",
        "Image-attention mass (mean over layers and heads) at the step that names each object:",
        "",
        head,
        *_image_mass_rows(results),
        "",
        "Image-minus-prior contrast log p(word | image) - log p(word | no image), nats:",
        "",
        head,
        *_contrast_rows(results),
        "",
        "Attention saturation over (layer, head, caption step):",
        "",
        head,
        *_saturation_rows(results),
        *_faint_sweep_lines(results, head),
    ]
    return "\n".join(lines) + "\n"


def _table_row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def _partner_rows(results: list[tuple[str, dict]]) -> list[str]:
    """p(partner) per image condition, one row each."""
    conditions = (
        ("real", "real image"),
        ("grey", "grey image"),
        ("image_free", "no image (image tokens removed)"),
        ("partner_drawn", "partner drawn in that object's place"),
        ("anchor_erased", "anchor erased from the image"),
    )
    return [_table_row(label, [_fmt(r["p_partner"][key]) for _, r in results]) for key, label in conditions]


def _image_mass_rows(results: list[tuple[str, dict]]) -> list[str]:
    """Image-attention mass at true objects by their place in the caption, then at hallucinated partners."""
    rows = []
    places = sorted({k for _, r in results for k in r["image_mass_true_by_place"]})
    for k in places:
        cells = []
        for _, r in results:
            v = r["image_mass_true_by_place"].get(k)
            cells.append(f"{_fmt(v[0], 3)} (n={v[1]})" if v else "-")
        rows.append(f"| true object, {k}. in the caption | " + " | ".join(cells) + " |")
    rows.append(
        "| hallucinated partner (misleading) | "
        + " | ".join(
            f"{_fmt(r['image_mass_hallucinated_partner'][0], 3)} (n={r['image_mass_hallucinated_partner'][1]}, "
            f"mean place {_fmt(r['hallucinated_partner_mean_place'], 1)})"
            for _, r in results
        )
        + " |"
    )
    return rows


def _contrast_rows(results: list[tuple[str, dict]]) -> list[str]:
    """The image-minus-prior contrast per kind of word, one row each."""
    kinds = (
        ("hallucinated_partner", "hallucinated partner (misleading)"),
        ("drawn_partner_named", "drawn partner, named (faint and test)"),
        ("other_true_object", "other true object (misleading)"),
    )
    return [
        _table_row(label, [f"{_fmt(r['contrast'][key][0])} (n={r['contrast'][key][1]})" for _, r in results])
        for key, label in kinds
    ]


def _saturation_rows(results: list[tuple[str, dict]]) -> list[str]:
    """How much of the attention is saturated on or off the image."""
    return [
        "| share with < 1% or > 99% of the mass on the image | "
        + " | ".join(f"{100 * r['saturated_share']:.1f}%" for _, r in results)
        + " |",
        "| heads always on the image (> 99%) / never (< 1%), of all | "
        + " | ".join(f"{r['heads_always_on_image']} / {r['heads_never_on_image']} of {r['heads']}" for _, r in results)
        + " |",
    ]


def _faint_sweep_lines(results: list[tuple[str, dict]], head: str) -> list[str]:
    """The faint-split sweep's table (partners named by visibility), when some model has one."""
    sweeps = [r.get("faint_partner_named") for _, r in results]
    if not any(sweeps):
        return []
    lines = ["", "Faint-split partners named, by the faint partners' visibility (share of colour kept):", "", head]
    for key in next(s for s in sweeps if s):
        lines.append(f"| {key} | " + " | ".join(f"{s[key]:.0f}%" if s and key in s else "-" for s in sweeps) + " |")
    return lines


def write_section(report: Path, section: str) -> None:
    text = report.read_text() if report.exists() else ""
    block = f"{MARK_BEGIN}\n{section}{MARK_END}\n"
    if MARK_BEGIN in text:
        before, rest = text.split(MARK_BEGIN, 1)
        text = before + block + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    report.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--world", default=None, help="world module file (default: halluguard.testbed.world)")
    parser.add_argument("--count", type=int, default=100, help="scenes per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        help="JSON results of another model (an earlier --json) to show beside these, as 'name=FILE' (repeatable)",
    )
    parser.add_argument("--write-report", action="store_true", help="put the section into the model's REPORT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.model, args.world, args.count, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    columns = [("this model", results)]
    for compare in args.compare:
        name, _, file = compare.partition("=")
        columns.append((name, json.loads(Path(file).read_text())))
    section = markdown(columns)
    print(section)
    if args.write_report:
        from . import path

        write_section(Path(args.model or path()) / "REPORT.md", section)


if __name__ == "__main__":
    main()
