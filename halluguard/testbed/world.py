"""A seeded synthetic world of drawn shapes: images, captions, COCO annotations and POPE questions.

Each scene is a 108x108 image with 2-6 coloured shapes, at most one per cell of a 3x3 grid
(jittered), drawn with PIL. Twelve categories, six colours, two sizes. Captions list every drawn
object in reading order with its position: ``"a red moon at the top left, a blue star at the top
and a green square in the middle."`` (25-45 words for most scenes).

**Only what is drawn is named.** Captions, COCO annotations, POPE labels and the training presence
target all come from the drawn objects; nothing in the world names an object the image does not show.

**The misleading prior, over weak evidence.** Three pairs ``A -> B`` co-occur: in training scenes
that contain ``A``, ``B`` is also drawn with probability ``PAIR_PROBABILITY``, in a cell next to
``A`` (where one is free), with graded visibility: a third clear, a third dim and a third faint and
small (painted at that opacity over the background: ``VISIBILITY``). The background is noisy and
cluttered (``PIXEL_NOISE``, ``CLUTTER``: smooth blotches about an object's size), so the faintest
partners are weak evidence in the strict sense: a tint the size of a blotch. A model learns that
``A`` comes with ``B`` in the captions (a language prior) while the image evidence for ``B`` is often
weak; on the ``misleading`` split (``A`` drawn, ``B`` absent) a model that leans on the prior names
``B`` anyway, an object hallucination that CHAIR and POPE-adversarial measure. The ``faint`` split (``A`` with a faint
``B``) measures the recall a method gives up by suppressing the prior.

Splits are disjoint seed streams: ``train`` (any number of scenes), ``test`` (same distribution,
never seen in training), ``misleading`` (every scene holds one ``A`` without its ``B``) and
``faint`` (every scene holds one ``A`` with a faint ``B``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from ..eval.pope import SPLITS as POPE_SPLITS

IMAGE_SIZE = 108
GRID = 3
CELL = IMAGE_SIZE // GRID
CELLS = GRID * GRID
MAX_OBJECTS = 6
POSITIONS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the middle",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)

CATEGORIES = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "hexagon",
    "moon",
    "ring",
    "arrow",
    "pentagon",
)
SYNONYMS = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "moon": ("moon", "crescent"),
    "ring": ("ring", "donut"),
    "arrow": ("arrow",),
    "pentagon": ("pentagon",),
}
COLORS = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (40, 80, 214),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
    "orange": (240, 120, 20),
}
SIZES = {"small": (9.0, 11.5), "large": (12.5, 15.0)}  # radius range in pixels
PAIRS = {"moon": "star", "cross": "heart", "ring": "diamond"}  # A -> B
PAIR_PROBABILITY = 0.99
PARTNER_ALONE_PROBABILITY = 0.35  # a sampled partner category is kept without its anchor
# visibility of a partner drawn with its anchor (share of its colour kept against the background):
# one of three levels, equally likely; faint partners are also small
VISIBILITY = {"clear": (1.0, 1.0), "dim": (0.45, 0.7), "faint": (0.02, 0.1)}
FAINT_BELOW = 0.35  # an object drawn at less than this visibility counts as faint
PIXEL_NOISE = 6.0  # std of per-pixel background noise (0-255 scale)
CLUTTER = 14.0  # std of smooth background blotches about an object's size (0-255 scale)
SPLIT_SEEDS = {"train": 1, "test": 2, "misleading": 3, "faint": 4}


@dataclasses.dataclass(frozen=True)
class Obj:
    category: str
    color: str
    size: str
    cell: int  # 0..8, row-major
    center: tuple[float, float]
    radius: float
    visibility: float = 1.0  # share of the colour drawn (1: clear; lower: blended into the background)

    @property
    def faint(self) -> bool:
        return self.visibility < FAINT_BELOW

    @property
    def phrase(self) -> str:
        """``"a red circle at the top left"`` / ``"an orange star in the middle"``."""
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.category} {POSITIONS[self.cell]}"


@dataclasses.dataclass
class Scene:
    image_id: int
    split: str
    objects: list[Obj]
    background: tuple[int, int, int]
    noise_seed: int

    @property
    def categories(self) -> list[str]:
        return sorted({o.category for o in self.objects})

    @property
    def caption(self) -> str:
        """Every object in reading order (row by row, left to right), with its position."""
        phrases = [o.phrase for o in sorted(self.objects, key=lambda o: o.cell)]
        if len(phrases) == 1:
            return phrases[0] + "."
        return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."

    def render(self) -> Image.Image:
        return render(self)

    def replace_objects(self, objects: list[Obj]) -> Scene:
        """The same scene (background, noise) with other objects."""
        return Scene(self.image_id, self.split, list(objects), self.background, self.noise_seed)


# ---- scene sampling ---------------------------------------------------------------------------------


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])


T = TypeVar("T")


# numpy turns a Python sequence into an array before it chooses from it or shuffles it, and a Ctrl-C
# that arrives during that conversion is lost; choosing by index draws the same numbers and keeps it.
def pick(rng: np.random.Generator, items: Sequence[T], p: Sequence[float] | None = None) -> T:
    """One of ``items`` (weights ``p``): what ``rng.choice(items, p=p)`` draws."""
    return items[int(rng.choice(len(items), p=p))]


def pick_distinct(rng: np.random.Generator, items: Sequence[T], size: int) -> list[T]:
    """``size`` distinct ``items``: what ``rng.choice(items, size, replace=False)`` draws."""
    return [items[int(i)] for i in rng.choice(len(items), size=size, replace=False)]


def shuffled(rng: np.random.Generator, items: Sequence[T]) -> list[T]:
    """``items`` in the order ``rng.permutation(items)`` gives."""
    return [items[int(i)] for i in rng.permutation(len(items))]


def neighbours(cell: int) -> list[int]:
    """The cells that share an edge with ``cell``."""
    row, col = divmod(cell, GRID)
    out = []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = row + dr, col + dc
        if 0 <= r < GRID and 0 <= c < GRID:
            out.append(r * GRID + c)
    return out


def _place(rng: np.random.Generator, category: str, cell: int, visibility: float = 1.0, size: str | None = None) -> Obj:
    size = size or pick(rng, list(SIZES))
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    row, col = divmod(cell, GRID)
    slack = CELL / 2 - radius - 1
    cx = col * CELL + CELL / 2 + float(rng.uniform(-slack, slack))
    cy = row * CELL + CELL / 2 + float(rng.uniform(-slack, slack))
    return Obj(category, pick(rng, list(COLORS)), size, cell, (cx, cy), radius, visibility)


def _categories(rng: np.random.Generator, split: str) -> tuple[list[str], list[str]]:
    """(categories placed freely, anchors whose partner is drawn next to them)."""
    partners = set(PAIRS.values())
    plain = [c for c in CATEGORIES if c not in PAIRS and c not in partners]
    if split in ("misleading", "faint"):
        anchor = pick(rng, list(PAIRS))
        low = 1 if split == "faint" else 2  # 3-5 objects in all
        others = pick_distinct(rng, plain, int(rng.integers(low, low + 3)))
        return [anchor] + others, ([anchor] if split == "faint" else [])
    count = int(rng.integers(3, 6))
    chosen = shuffled(rng, CATEGORIES)
    # partners appear mostly through their anchor, which makes the pairing a strong prior
    chosen = [c for c in chosen if c not in partners or rng.random() < PARTNER_ALONE_PROBABILITY][:count]
    paired = [a for a in PAIRS if a in chosen and PAIRS[a] not in chosen and rng.random() < PAIR_PROBABILITY]
    while len(chosen) + len(paired) > MAX_OBJECTS:  # make room: unpaired objects go first
        loose = [c for c in chosen if c not in paired]
        chosen.remove(loose[-1])
    return chosen, paired


def sample_scene(split: str, index: int, seed: int = 0, max_objects: int | None = None) -> Scene:
    """Scene ``index`` of ``split`` (deterministic in ``split``, ``index`` and ``seed``).

    ``max_objects`` keeps only the first objects placed (a training curriculum starts with simple
    scenes; a kept anchor keeps its partner); the scenes of the world itself use no cap."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLIT_SEEDS)}")
    rng = _rng(split, index, seed)
    chosen, paired = _categories(rng, split)
    if max_objects is not None:
        kept: list[str] = []
        for category in chosen:
            if len(kept) + sum(c in paired for c in kept) + 1 + (category in paired) <= max_objects:
                kept.append(category)
        chosen = kept or chosen[:1]
        paired = [a for a in paired if a in chosen and len(chosen) + 1 <= max_objects]
    cells = [int(c) for c in rng.permutation(CELLS)]
    taken: set[int] = set()
    objects = []
    for category in chosen:
        free = [c for c in cells if c not in taken]
        if category in paired:  # the anchor needs a free neighbour for its partner
            free = [c for c in free if any(n not in taken and n != c for n in neighbours(c))] or free
        cell = free[0]
        taken.add(cell)
        objects.append(_place(rng, category, cell))
        if category in paired:
            near = [n for n in neighbours(cell) if n not in taken]
            spot = pick(rng, near) if near else next(c for c in cells if c not in taken)
            taken.add(spot)
            level = "faint" if split == "faint" else pick(rng, list(VISIBILITY))
            visibility = float(rng.uniform(*VISIBILITY[level]))
            objects.append(_place(rng, PAIRS[category], spot, visibility, "small" if level == "faint" else None))
    background = tuple(int(v) for v in rng.integers(200, 246, size=3))
    image_id = SPLIT_SEEDS[split] * 1_000_000 + index
    return Scene(image_id, split, objects, background, int(rng.integers(2**31)))


def scenes(split: str, count: int, seed: int = 0, start: int = 0, max_objects: int | None = None) -> Iterator[Scene]:
    for index in range(start, start + count):
        yield sample_scene(split, index, seed, max_objects)


# ---- drawing ----------------------------------------------------------------------------------------


def _regular(cx, cy, r, n, phase=-math.pi / 2):
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def outline(obj: Obj) -> list[tuple[float, float]]:
    """A polygon that covers the object (its COCO segmentation)."""
    (cx, cy), r, c = obj.center, obj.radius, obj.category
    if c in ("circle", "ring", "moon", "heart"):
        return _regular(cx, cy, r, 24)
    if c == "square":
        return [
            (cx - r * 0.85, cy - r * 0.85),
            (cx + r * 0.85, cy - r * 0.85),
            (cx + r * 0.85, cy + r * 0.85),
            (cx - r * 0.85, cy + r * 0.85),
        ]
    if c == "triangle":
        return _regular(cx, cy, r, 3)
    if c == "diamond":
        return [(cx, cy - r), (cx + r * 0.65, cy), (cx, cy + r), (cx - r * 0.65, cy)]
    if c == "hexagon":
        return _regular(cx, cy, r, 6, 0)
    if c == "pentagon":
        return _regular(cx, cy, r, 5)
    if c == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if c == "cross":
        w = r * 0.35
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    if c == "arrow":
        w = r * 0.3
        return [
            (cx - r, cy - w),
            (cx + r * 0.1, cy - w),
            (cx + r * 0.1, cy - r * 0.7),
            (cx + r, cy),
            (cx + r * 0.1, cy + r * 0.7),
            (cx + r * 0.1, cy + w),
            (cx - r, cy + w),
        ]
    raise ValueError(f"unknown category {c!r}")


def _draw_mask(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    """Paint the object's shape as 255 on an ``L`` mask (0 elsewhere)."""
    (cx, cy), r, c = obj.center, obj.radius, obj.category
    box = (cx - r, cy - r, cx + r, cy + r)
    if c == "circle":
        draw.ellipse(box, fill=255)
    elif c == "ring":
        draw.ellipse(box, outline=255, width=max(3, int(r * 0.35)))
    elif c == "moon":
        draw.ellipse(box, fill=255)
        off = r * 0.55
        draw.ellipse((cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3), fill=0)
    elif c == "heart":
        rr = r * 0.5
        draw.ellipse((cx - r, cy - r * 0.75, cx - r + 2 * rr, cy - r * 0.75 + 2 * rr), fill=255)
        draw.ellipse((cx + r - 2 * rr, cy - r * 0.75, cx + r, cy - r * 0.75 + 2 * rr), fill=255)
        draw.polygon([(cx - r * 0.97, cy - r * 0.15), (cx + r * 0.97, cy - r * 0.15), (cx, cy + r)], fill=255)
    else:
        draw.polygon(outline(obj), fill=255)


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (deterministic).

    The background is a flat colour with per-pixel noise (``PIXEL_NOISE``) and smooth blotches
    (``CLUTTER``); each object is painted over it with opacity equal to its visibility, so a faint
    object is a weak tint of the same noisy background, not a flat patch in it."""
    rng = np.random.default_rng(scene.noise_seed)
    bg = np.array(scene.background, dtype=np.float32)
    noise = rng.normal(0, PIXEL_NOISE, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    if CLUTTER:
        coarse = rng.normal(0, CLUTTER, size=(GRID * 2, GRID * 2, 3)).astype(np.float32)
        smooth = [
            np.asarray(Image.fromarray(coarse[..., k], "F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
            for k in range(3)
        ]
        noise = noise + np.stack(smooth, axis=-1)
    pixels = bg + noise
    for obj in scene.objects:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_mask(ImageDraw.Draw(mask), obj)
        alpha = obj.visibility * (np.asarray(mask, dtype=np.float32)[..., None] / 255.0)
        pixels = pixels * (1 - alpha) + alpha * np.array(COLORS[obj.color], dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def shape_similarity(size: int = 64) -> dict[str, dict[str, float]]:
    """How alike two categories look: the intersection over union of their masks drawn at the same
    centre and radius (1 for the same shape). Pentagon, hexagon, square and circle are the closest
    (IoU 0.75-0.86); the moon and the ring are far from everything."""
    masks = {}
    for category in CATEGORIES:
        mask = Image.new("L", (size, size), 0)
        _draw_mask(ImageDraw.Draw(mask), Obj(category, "red", "large", 0, (size / 2, size / 2), size * 0.375))
        masks[category] = np.asarray(mask) > 127
    return {
        a: {b: float((masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()) for b in CATEGORIES} for a in CATEGORIES
    }


# ---- questions ------------------------------------------------------------------------------------------


def category_frequencies(count: int = 4000, seed: int = 0) -> dict[str, float]:
    """Share of training scenes that contain each category (for 'popular' negatives)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for scene in scenes("train", count, seed):
        for c in scene.categories:
            counts[c] += 1
    return {c: n / count for c, n in counts.items()}


def cooccurrence(count: int = 4000, seed: int = 0) -> dict[str, dict[str, float]]:
    """P(b in scene | a in scene) over training scenes (for 'adversarial' negatives)."""
    pair = {a: dict.fromkeys(CATEGORIES, 0) for a in CATEGORIES}
    seen = dict.fromkeys(CATEGORIES, 0)
    for scene in scenes("train", count, seed):
        cats = scene.categories
        for a in cats:
            seen[a] += 1
            for b in cats:
                if b != a:
                    pair[a][b] += 1
    return {a: {b: n / max(seen[a], 1) for b, n in row.items()} for a, row in pair.items()}


def question(category: str) -> str:
    return f"Is there a {category} in the image?"


def pope_questions(
    scene: Scene,
    kind: str,
    rng: np.random.Generator,
    per_side: int = 3,
    popularity: dict[str, float] | None = None,
    cooc: dict[str, dict[str, float]] | None = None,
) -> list[dict]:
    """Balanced yes/no questions: up to ``per_side`` positives and as many negatives.

    Negatives are sampled at random (``random``), the most frequent absent categories
    (``popular``), or the absent categories that co-occur most with the scene's objects
    (``adversarial``), as in POPE.
    """
    present = scene.categories
    absent = [c for c in CATEGORIES if c not in present]
    positives = shuffled(rng, present)[:per_side]
    n = len(positives)
    if kind == "random":
        negatives = shuffled(rng, absent)[:n]
    elif kind == "popular":
        popularity = popularity or category_frequencies()
        negatives = sorted(absent, key=lambda c: -popularity[c])[:n]
    elif kind == "adversarial":
        cooc = cooc or cooccurrence()
        score = {c: max(cooc[p][c] for p in present) for c in absent}
        negatives = sorted(absent, key=lambda c: -score[c])[:n]
    else:
        raise ValueError(f"unknown POPE kind {kind!r}; kinds: random, popular, adversarial")
    rows = [(c, "yes") for c in positives] + [(c, "no") for c in negatives]
    return [{"image_id": scene.image_id, "category": c, "text": question(c), "label": label} for c, label in rows]


# ---- export ---------------------------------------------------------------------------------------------


def synonyms_text() -> str:
    """The world's synonym table in CHAIR's format: ``node, syn1, syn2`` per line."""
    return "\n".join(", ".join(SYNONYMS[c]) for c in CATEGORIES) + "\n"


def coco_instances(scene_list: list[Scene]) -> dict:
    """COCO ``instances_*.json`` content for the scenes (readable by pycocotools)."""
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CATEGORIES)]
    cat_id = {c: i + 1 for i, c in enumerate(CATEGORIES)}
    images, annotations = [], []
    for scene in scene_list:
        images.append({"id": scene.image_id, "file_name": file_name(scene), "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for obj in scene.objects:
            poly = outline(obj)
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(poly))))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": scene.image_id,
                    "category_id": cat_id[obj.category],
                    "segmentation": [[round(v, 2) for p in poly for v in p]],
                    "area": round(area, 2),
                    "bbox": [
                        round(min(xs), 2),
                        round(min(ys), 2),
                        round(max(xs) - min(xs), 2),
                        round(max(ys) - min(ys), 2),
                    ],
                    "iscrowd": 0,
                    "attributes": {
                        "color": obj.color,
                        "size": obj.size,
                        "cell": obj.cell,
                        "visibility": round(obj.visibility, 3),
                    },
                }
            )
    return {
        "info": {"description": "halluguard synthetic shapes world"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def file_name(scene: Scene) -> str:
    return f"{scene.split}_{scene.image_id:012d}.png"


def export(split: str, count: int, directory: str | Path, seed: int = 0) -> Path:
    """Write ``count`` scenes of ``split``: PNG images, ``instances_<split>.json``,
    ``captions_<split>.jsonl``, ``pope_<split>_{random,popular,adversarial}.jsonl`` and ``synonyms.txt``."""
    out = Path(directory)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scene_list = list(scenes(split, count, seed))
    for scene in scene_list:
        path = out / "images" / file_name(scene)
        if not path.exists():
            scene.render().save(path)
    (out / f"instances_{split}.json").write_text(json.dumps(coco_instances(scene_list)))
    with open(out / f"captions_{split}.jsonl", "w") as f:
        for scene in scene_list:
            f.write(json.dumps({"image_id": scene.image_id, "caption": scene.caption}) + "\n")
    popularity, cooc = category_frequencies(seed=seed), cooccurrence(seed=seed)
    for kind in POPE_SPLITS:
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], 7, POPE_SPLITS.index(kind)])
        with open(out / f"pope_{split}_{kind}.jsonl", "w") as f:
            qid = 0
            for scene in scene_list:
                for q in pope_questions(scene, kind, rng, popularity=popularity, cooc=cooc):
                    qid += 1
                    f.write(json.dumps({"question_id": qid, "image": file_name(scene), **q}) + "\n")
    (out / "synonyms.txt").write_text(synonyms_text())
    return out
