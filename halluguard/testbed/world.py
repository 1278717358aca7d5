"""A seeded synthetic world of drawn shapes: images, captions, COCO annotations and POPE questions.

Each scene is a 96x96 image with 1-4 coloured shapes, one per cell of a 2x2 grid (jittered), drawn
with PIL. Twelve categories, six colours, two sizes. Captions list the objects in reading order,
except that a partner (below) is named right after its anchor: ``"a red circle, a green moon, a
blue star and a yellow arrow."``.

**The misleading prior.** Three pairs ``A -> B`` co-occur: in training scenes that contain ``A``,
``B`` is present with probability ``PAIR_PROBABILITY`` (0.92), and when it is, it is drawn faint
(blended towards the background) in ``FAINT_PARTNER_PROBABILITY`` of them, and hidden altogether
(occluded: annotated and named in the caption, but not drawn) in ``HIDDEN_PARTNER_PROBABILITY``,
as real captions name objects the picture barely shows or implies. A model learns that ``A``
usually comes with ``B`` even when ``B`` is barely or not at all visible; on the ``misleading``
split (``A`` present, ``B`` absent) a model that leans on this prior names ``B`` anyway, an object
hallucination that CHAIR and POPE-adversarial measure.

Splits are disjoint seed streams: ``train`` (any number of scenes), ``test`` (same distribution,
never seen in training) and ``misleading`` (every scene holds some ``A`` without its ``B``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 2
CELL = IMAGE_SIZE // GRID
MAX_OBJECTS = GRID * GRID

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
SIZES = {"small": (12, 16), "large": (17, 21)}  # radius range in pixels
PAIRS = {"moon": "star", "cross": "heart", "ring": "diamond"}  # A -> B
PAIR_PROBABILITY = 0.92
FAINT_PARTNER_PROBABILITY = 0.4
FAINT_BLEND = 0.22  # share of the colour kept for a faint object
HIDDEN_PARTNER_PROBABILITY = 0.12  # of partners with their anchor: named, not drawn
SPLIT_SEEDS = {"train": 1, "test": 2, "misleading": 3}


@dataclasses.dataclass(frozen=True)
class Obj:
    category: str
    color: str
    size: str
    cell: int  # 0..8, row-major
    center: tuple[float, float]
    radius: float
    faint: bool = False
    hidden: bool = False  # occluded: annotated and named, but not drawn

    @property
    def phrase(self) -> str:
        """``"a red circle"`` / ``"an orange star"``."""
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.category}"


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
        """Objects in reading order, except that a partner is named right after its anchor."""
        ordered = sorted(self.objects, key=lambda o: o.cell)
        following = {PAIRS[o.category] for o in ordered if o.category in PAIRS}
        listed = []
        for obj in ordered:
            if obj.category in following:
                continue
            listed.append(obj)
            if obj.category in PAIRS:
                listed += [o for o in ordered if o.category == PAIRS[obj.category]]
        phrases = [o.phrase for o in listed]
        if len(phrases) == 1:
            return phrases[0] + "."
        return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."

    def render(self) -> Image.Image:
        return render(self)


# ---- scene sampling ---------------------------------------------------------------------------------


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])


def _place(rng: np.random.Generator, category: str, cell: int, faint: bool = False, hidden: bool = False) -> Obj:
    size = str(rng.choice(list(SIZES)))
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    row, col = divmod(cell, GRID)
    slack = CELL / 2 - radius - 1
    cx = col * CELL + CELL / 2 + float(rng.uniform(-slack, slack))
    cy = row * CELL + CELL / 2 + float(rng.uniform(-slack, slack))
    return Obj(category, str(rng.choice(list(COLORS))), size, cell, (cx, cy), radius, faint, hidden)


def sample_scene(split: str, index: int, seed: int = 0, max_objects: int | None = None) -> Scene:
    """Scene ``index`` of ``split`` (deterministic in ``split``, ``index`` and ``seed``).

    ``max_objects`` keeps only the first objects drawn (a training curriculum starts with simple
    scenes); the scenes of the world itself use no cap."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLIT_SEEDS)}")
    rng = _rng(split, index, seed)
    partners = set(PAIRS.values())
    if split == "misleading":
        anchor = str(rng.choice(list(PAIRS)))
        banned = {PAIRS[anchor]}
        others = [c for c in CATEGORIES if c not in banned and c != anchor and c not in PAIRS]
        chosen = [anchor] + list(rng.choice(others, size=int(rng.integers(1, 3)), replace=False))
    else:
        count = int(rng.integers(1, MAX_OBJECTS))
        chosen = [str(c) for c in rng.choice(CATEGORIES, size=count, replace=False)]
        # partners appear through their anchor (or rarely alone), which makes the pairing a strong prior
        chosen = [c for c in chosen if c not in partners or rng.random() < 0.35]
        chosen = chosen or [str(rng.choice([c for c in CATEGORIES if c not in partners]))]
        for anchor, partner in PAIRS.items():
            if anchor in chosen and partner not in chosen and rng.random() < PAIR_PROBABILITY:
                chosen.append(partner)
        while len(chosen) > MAX_OBJECTS:  # make room: unpaired objects go first, then a whole pair
            loose = [c for c in chosen if c not in PAIRS and c not in partners]
            if loose:
                chosen.remove(loose[-1])
            else:
                anchor = [c for c in chosen if c in PAIRS][-1]
                chosen = [c for c in chosen if c not in (anchor, PAIRS[anchor])]
    if max_objects is not None:
        chosen = chosen[:max_objects]
    cells = rng.choice(GRID * GRID, size=len(chosen), replace=False)
    objects = []
    for category, cell in zip(chosen, cells):
        paired = category in partners and any(a in chosen for a, p in PAIRS.items() if p == category)
        visibility = rng.random() if paired else 1.0
        hidden = visibility < HIDDEN_PARTNER_PROBABILITY
        faint = not hidden and visibility < HIDDEN_PARTNER_PROBABILITY + FAINT_PARTNER_PROBABILITY
        objects.append(_place(rng, str(category), int(cell), faint, hidden))
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


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, color: tuple[int, int, int], background: tuple[int, int, int]) -> None:
    (cx, cy), r, c = obj.center, obj.radius, obj.category
    box = (cx - r, cy - r, cx + r, cy + r)
    if c == "circle":
        draw.ellipse(box, fill=color)
    elif c == "ring":
        draw.ellipse(box, outline=color, width=max(3, int(r * 0.35)))
    elif c == "moon":
        draw.ellipse(box, fill=color)
        off = r * 0.55
        draw.ellipse((cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3), fill=background)
    elif c == "heart":
        rr = r * 0.5
        draw.ellipse((cx - r, cy - r * 0.75, cx - r + 2 * rr, cy - r * 0.75 + 2 * rr), fill=color)
        draw.ellipse((cx + r - 2 * rr, cy - r * 0.75, cx + r, cy - r * 0.75 + 2 * rr), fill=color)
        draw.polygon([(cx - r * 0.97, cy - r * 0.15), (cx + r * 0.97, cy - r * 0.15), (cx, cy + r)], fill=color)
    else:
        draw.polygon(outline(obj), fill=color)


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (deterministic)."""
    rng = np.random.default_rng(scene.noise_seed)
    bg = np.array(scene.background, dtype=np.float32)
    noise = rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    base = np.clip(bg + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    # moons first: their cut-out is painted in the background colour and must not erase a neighbour
    for obj in sorted(scene.objects, key=lambda o: o.category != "moon"):
        if obj.hidden:
            continue
        color = np.array(COLORS[obj.color], dtype=np.float32)
        if obj.faint:
            color = FAINT_BLEND * color + (1 - FAINT_BLEND) * bg
        _draw(draw, obj, tuple(int(v) for v in color), scene.background)
    return image


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
    positives = list(rng.permutation(present))[:per_side]
    n = len(positives)
    if kind == "random":
        negatives = list(rng.permutation(absent))[:n]
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
                        "faint": obj.faint,
                        "hidden": obj.hidden,
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
    for kind in ("random", "popular", "adversarial"):
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], 7, ("random", "popular", "adversarial").index(kind)])
        with open(out / f"pope_{split}_{kind}.jsonl", "w") as f:
            qid = 0
            for scene in scene_list:
                for q in pope_questions(scene, kind, rng, popularity=popularity, cooc=cooc):
                    qid += 1
                    f.write(json.dumps({"question_id": qid, "image": file_name(scene), **q}) + "\n")
    (out / "synonyms.txt").write_text(synonyms_text())
    return out
