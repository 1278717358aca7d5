"""CHAIR: object hallucination in image captions (Rohrbach et al., 2018), scored fully offline.

For captions ``c = 1..N`` with mentioned node words ``M_c`` (repeats kept) and ground-truth
objects ``G_c``:

* ``CHAIR_i = sum_c |{m in M_c : m not in G_c}| / sum_c |M_c|`` (per mention);
* ``CHAIR_s`` = share of captions with at least one hallucinated mention;
* ``recall = sum_c |unique(M_c) & G_c| / sum_c |G_c|``;
* ``len`` = mean number of tokens after the two-word merge (punctuation included);
* ``precision`` = mean over captions of ``|unique correct| / |unique mentioned|`` (PAI's add-on).

Percentages are reported as papers print them (x100). A caption goes through the standard
pipeline: lower-case, tokenise, normalise each token, merge two-word objects (``"fire hydrant"``,
``"baby cat"`` -> ``cat``, ``"passenger train"`` -> ``train``, ``"toilet seat"`` -> ``toilet``,
blockers such as ``"train track"``), drop ``seat`` when ``toilet`` is present, keep the tokens
in the synonym table and map them to their node words.

Normalisers: ``"lemma"`` (default) reproduces the POS-aware WordNet lemmatiser of the common
Python-3 implementation with lemminflect's bundled tables (nouns to their singular, ``-ing``
verb forms to their verb lemma, as the tagger labels them in captions), so no NLTK data download
is needed; ``"singularize"`` is the original rule-based singulariser; ``"none"`` leaves tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "data" / "chair"
COCO_SYNONYMS = DATA / "synonyms.txt"
COCO_GT = DATA / "coco2014_gt_objects.json.gz"
OPERA_500_IDS = DATA / "opera_500_val2014_image_ids.txt"
CHAIR_PROMPT = "Please describe this image in detail."  # the caption prompt of CHAIR evaluations (OPERA's)

COCO_DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
PASSENGER_VEHICLES = ("jet", "train")


def coco_double_words() -> dict[str, str]:
    """The two-word merge table of the standard pipeline (objects, qualifiers, blockers, fixes)."""
    table = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in PASSENGER_VEHICLES:
        table[f"passenger {vehicle}"] = vehicle
    table.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return table


def read_synonyms(text: str) -> list[list[str]]:
    """Lines ``node, syn1, syn2``; entries are split on ``", "`` exactly as the reference does
    (an entry after a double space keeps its leading space and never matches)."""
    return [line.strip().split(", ") for line in text.splitlines() if line.strip()]


# ---- tokenising and normalising --------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|n't|'s|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Word tokens of lower-cased text, with punctuation, "n't" and "'s" split off."""
    text = re.sub(r"n't\b", " n't", text.lower())
    text = re.sub(r"'s\b", " 's", text)
    return _TOKEN.findall(text)


_IRREGULAR = {
    "people": "person",
    "children": "child",
    "men": "man",
    "women": "woman",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "knives": "knife",
    "wives": "wife",
    "leaves": "leaf",
    "shelves": "shelf",
    "wolves": "wolf",
    "halves": "half",
    "loaves": "loaf",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "skis": "ski",
    "glasses": "glas",
    "buses": "bus",
    "series": "series",
    "species": "species",
    "oxen": "ox",
    "cacti": "cactus",
}


def singularize(word: str) -> str:
    """Rule-based English singular, after the original CHAIR's singulariser (including its
    ``glasses -> glas``, which the ``"wine glas"`` merge repairs)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses", "oes")):
        return word[:-2]
    return word[:-1]


@lru_cache(maxsize=65536)
def lemmatize(word: str) -> str:
    """POS-aware lemma: ``-ing`` forms take their verb lemma, everything else its noun lemma."""
    from lemminflect import getLemma

    if not word.isalpha():
        return word
    if word.endswith("ing") and len(word) > 5:
        verb = getLemma(word, upos="VERB")
        if verb and verb[0] != word:
            return verb[0]
    noun = getLemma(word, upos="NOUN")
    return noun[0] if noun else word


NORMALISERS = {"lemma": lemmatize, "singularize": singularize, "none": lambda w: w}


def drop_incomplete_sentence(caption: str) -> str:
    """For the 64-token regime: cut a last sentence that the token limit left unfinished."""
    text = caption.rstrip()
    if not text or text.endswith((".", "!", "?")):
        return text
    cut = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
    return text[: cut + 1] if cut >= 0 else text


# ---- the scorer ------------------------------------------------------------------------------------------


class Chair:
    """CHAIR with a synonym table, a two-word table and a ground-truth object table.

    ``Chair()`` is the standard COCO setting with the packaged ground truth; for another world,
    pass its ``synonyms`` text and ``gt`` mapping (``image_id -> node words``), e.g. from
    ``gt_from_coco_annotations``.
    """

    def __init__(
        self,
        synonyms: str | None = None,
        gt: dict | None = None,
        double_words: dict[str, str] | None = None,
        normaliser: str = "lemma",
    ):
        if normaliser not in NORMALISERS:
            raise ValueError(f"unknown normaliser {normaliser!r}; choose from {', '.join(NORMALISERS)}")
        is_coco = synonyms is None
        table = read_synonyms(synonyms if synonyms is not None else COCO_SYNONYMS.read_text())
        self.node_words = [line[0] for line in table]
        self.inverse = {syn: line[0] for line in table for syn in line}
        self.double_words = double_words if double_words is not None else (coco_double_words() if is_coco else {})
        self.normalise = NORMALISERS[normaliser]
        self.normaliser = normaliser
        self._gt = gt if gt is not None else (None if not is_coco else "coco")

    @property
    def gt(self) -> dict[int, set[str]]:
        if self._gt == "coco":
            self._gt = load_coco_gt()
        if self._gt is None:
            raise ValueError("no ground truth: pass gt= (image_id -> objects) or use the COCO setting")
        return self._gt

    def caption_to_words(self, caption: str) -> tuple[list[str], list[str], int]:
        """(object words as written after the merge, their node words, token count)."""
        words = [self.normalise(w) for w in tokenize(caption)]
        merged, i = [], 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if i + 1 < len(words) and pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(words[i])
                i += 1
        if "toilet" in merged and "seat" in merged:
            merged = [w for w in merged if w != "seat"]
        objects = [w for w in merged if w in self.inverse]
        return objects, [self.inverse[w] for w in objects], len(merged)

    def score(
        self,
        records: Iterable[dict],
        gt: dict | None = None,
        short: bool = False,
        image_id_key: str = "image_id",
        caption_key: str = "caption",
    ) -> dict:
        """Score ``records`` (``{"image_id", "caption"}``); ``short`` drops a last unfinished sentence."""
        gt_table = gt if gt is not None else self.gt
        scored = [self._score_caption(r, gt_table, short, image_id_key, caption_key) for r in records]
        if not scored:
            raise ValueError("no captions to score")
        details = [detail for detail, _ in scored]
        tokens = sum(n_tokens for _, n_tokens in scored)
        return {**_metrics(details, tokens), "normaliser": self.normaliser, "short": short, "captions": details}

    def _score_caption(
        self, record: dict, gt_table: dict, short: bool, image_id_key: str, caption_key: str
    ) -> tuple[dict, int]:
        """One caption's mentions against its image's ground-truth objects, and its token count."""
        image_id = int(record[image_id_key])
        caption = record[caption_key]
        if short:
            caption = drop_incomplete_sentence(caption)
        if image_id not in gt_table:
            raise KeyError(f"image {image_id} has no ground-truth objects")
        truth = set(gt_table[image_id])
        words, nodes, n_tokens = self.caption_to_words(caption)
        bad = [(w, n) for w, n in zip(words, nodes) if n not in truth]
        detail = {
            "image_id": image_id,
            "caption": caption,
            "mentioned": nodes,
            "mentioned_words": words,
            "hallucinated": [n for _, n in bad],
            "gt_objects": sorted(truth),
            "chair_i": 100.0 * len(bad) / len(nodes) if nodes else 0.0,
        }
        return detail, n_tokens


def _metrics(details: list[dict], tokens: int) -> dict:
    """CHAIR_s, CHAIR_i, recall, precision, F1 and mean length (see the module docstring) over the
    per-caption ``details`` of :meth:`Chair.score`, ``tokens`` in all."""
    n = len(details)
    mentions = sum(len(d["mentioned"]) for d in details)
    hallucinated = sum(len(d["hallucinated"]) for d in details)
    with_hallucination = sum(bool(d["hallucinated"]) for d in details)
    correct = [set(d["mentioned"]) & set(d["gt_objects"]) for d in details]
    covered = sum(len(c) for c in correct)
    gt_total = sum(len(d["gt_objects"]) for d in details)
    precisions = [len(c) / len(set(d["mentioned"])) for c, d in zip(correct, details) if d["mentioned"]]
    precision = 100.0 * sum(precisions) / len(precisions) if precisions else 0.0
    recall = 100.0 * covered / gt_total if gt_total else 0.0
    return {
        "chair_s": 100.0 * with_hallucination / n,
        "chair_i": 100.0 * hallucinated / max(mentions, 1),
        "recall": recall,
        "precision": precision,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "len": tokens / n,
        "n": n,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
    }


def score(records: Iterable[dict], gt: dict | None = None, **kwargs) -> dict:
    """CHAIR with the COCO synonyms; ``gt`` defaults to the packaged COCO-2014 object table."""
    normaliser = kwargs.pop("normaliser", "lemma")
    return Chair(normaliser=normaliser).score(records, gt=gt, **kwargs)


@lru_cache(maxsize=1)
def _coco_gt_cached() -> dict[int, frozenset[str]]:
    with gzip.open(COCO_GT, "rt") as f:
        return {int(k): frozenset(v) for k, v in json.load(f).items()}


def load_coco_gt() -> dict[int, frozenset[str]]:
    """The packaged COCO-2014 ground-truth objects (train and val, 123,287 images)."""
    return _coco_gt_cached()


def opera_500_ids() -> list[int]:
    return [int(line) for line in OPERA_500_IDS.read_text().split()]


def gt_from_coco_annotations(
    directory: str | Path, synonyms: str | None = None, normaliser: str = "lemma"
) -> dict[int, set[str]]:
    """Ground truth from COCO-format files in ``directory``: node words of every
    ``instances_*.json`` category, united with objects found in ``captions_*.json`` (if any)."""
    from pycocotools.coco import COCO

    chair = Chair(synonyms=synonyms, gt={}, normaliser=normaliser, double_words=None if synonyms is None else {})
    folder = Path(directory)
    instance_files = sorted(folder.glob("instances_*.json"))
    if not instance_files:
        raise FileNotFoundError(f"no instances_*.json in {folder}")
    gt: dict[int, set[str]] = {}
    for path in instance_files:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
            coco = COCO(str(path))
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        for image_id in coco.getImgIds():
            objects = gt.setdefault(int(image_id), set())
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                _, nodes, _ = chair.caption_to_words(names[ann["category_id"]])
                objects.update(nodes)
    for path in sorted(folder.glob("captions_*.json")):
        for ann in json.loads(path.read_text())["annotations"]:
            _, nodes, _ = chair.caption_to_words(ann["caption"])
            gt.setdefault(int(ann["image_id"]), set()).update(nodes)
    return gt


def read_records(path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption") -> list[dict]:
    """Captions from JSON lines, a JSON list, or a JSON object holding a list under
    ``captions``/``results``/``records``; each must be an object with an integer image id and a
    caption string. Raises ``ValueError`` naming the line (or list item) of the first bad record."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
        where = "item"
    except json.JSONDecodeError:
        data, where = None, "line"
    if data is None:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    else:
        if isinstance(data, dict):
            lists = [data[k] for k in ("captions", "results", "records") if isinstance(data.get(k), list)]
            data = lists[0] if lists else [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected JSON lines, a JSON list or an object of records")
        numbered = list(enumerate(data, 1))
    records, seen = [], {}
    for number, record in numbered:
        place = f"{path}: {where} {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{place} is not an object with {image_id_key!r} and {caption_key!r}")
        for key in (image_id_key, caption_key):
            if key not in record:
                raise ValueError(f"{place} has no {key!r} (keys: {', '.join(map(str, record)) or 'none'})")
        if not isinstance(record[caption_key], str):
            raise ValueError(f"{place}: {caption_key!r} is not a string")
        try:
            image_id = int(record[image_id_key])
        except (TypeError, ValueError):
            raise ValueError(f"{place}: image id {record[image_id_key]!r} is not an integer") from None
        if image_id in seen:
            raise ValueError(
                f"{place} repeats image {image_id} ({where} {seen[image_id]}); a file holds one caption per image"
            )
        seen[image_id] = number
        records.append({**record, image_id_key: image_id, "_where": place})
    if not records:
        raise ValueError(f"{path} holds no captions")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halluguard.eval.chair", description="Score captions with CHAIR.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a caption file and print the JSON result")
    s.add_argument(
        "file",
        help="JSON lines (or a JSON list) of {image_id, caption}, one caption per image (a repeated image is refused)",
    )
    s.add_argument(
        "--coco-annotations",
        help="folder with instances_*.json (and captions_*.json) to build the "
        "ground truth from, instead of the packaged COCO-2014 table",
    )
    s.add_argument("--synonyms", help="synonym table (CHAIR format) for a non-COCO dataset")
    s.add_argument("--short", action="store_true", help="64-token regime: drop a last unfinished sentence")
    s.add_argument("--normaliser", default="lemma", choices=sorted(NORMALISERS), help="(default: lemma)")
    s.add_argument("--image-id-key", default="image_id", help="(default: image_id)")
    s.add_argument("--caption-key", default="caption", help="(default: caption)")
    s.add_argument("--details", action="store_true", help="include per-caption details")
    args = parser.parse_args(argv)
    if args.synonyms and not args.coco_annotations:
        parser.error("--synonyms needs --coco-annotations (the ground truth of that dataset)")
    try:
        records = read_records(args.file, args.image_id_key, args.caption_key)
        synonyms = Path(args.synonyms).read_text() if args.synonyms else None
        gt = None
        if args.coco_annotations:
            gt = gt_from_coco_annotations(args.coco_annotations, synonyms, args.normaliser)
        double_words = None if synonyms is None else {}
        chair = Chair(synonyms=synonyms, gt=gt, normaliser=args.normaliser, double_words=double_words)
        for record in records:
            if record[args.image_id_key] not in chair.gt:
                raise ValueError(f"{record['_where']}: image {record[args.image_id_key]} has no ground-truth objects")
        result = chair.score(records, short=args.short, image_id_key=args.image_id_key, caption_key=args.caption_key)
    except (OSError, ValueError) as err:
        message = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.strerror else str(err)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    if not args.details:
        result.pop("captions")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
