"""Run CHAIR and POPE: generate with any method composition, write rows as they come, resume.

Each run lives in a folder (``--out``). Per-sample rows go to ``samples.jsonl`` (one file per
process when sharded: ``samples.rank<r>.jsonl``), flushed after every batch; a rerun reads the
rows already there and only generates the missing ones, so a killed run loses at most the batch in
flight and its totals equal an uninterrupted run's. A missing or unreadable image becomes an error
row, not a crash. ``results.json`` records the metrics with the model, method configs, decoding
settings, data file hashes, image ids and package version.

Sharding: under ``accelerate launch``, process ``r`` of ``W`` takes every ``W``-th sample from
``r``; process 0 waits for the others, merges the rows and scores.

Data sources: COCO (``--coco-images DIR`` with val2014 file names; ground truth and POPE questions
are packaged) or the shipped test model's synthetic world (``--dataset testbed``; images are
rendered on the fly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import chair as chair_lib
from . import pope as pope_lib

CHAIR_PROMPT = "Please describe this image in detail."


@dataclasses.dataclass
class Sample:
    key: str  # unique id of the row
    image_id: Any
    load_image: Callable[[], Any]  # -> PIL image (may raise)
    prompt: str
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Settings:
    max_new_tokens: int
    batch_size: int = 8
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kwargs


# ---- models ------------------------------------------------------------------------------------------


def load_model(spec: str, dtype: str = "auto", device: str | None = None):
    """``(model, processor, name)`` for ``"testbed"`` (the shipped model) or a hub id / local path."""
    if spec == "testbed":
        from ..testbed import load, path

        model, processor = load()
        return model, processor, str(path())
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=torch_dtype)
    if device is None and torch.cuda.is_available():
        from accelerate import PartialState

        device = PartialState().device  # under `accelerate launch`: this process's GPU
    if device:
        model.to(device)
    processor = AutoProcessor.from_pretrained(spec)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor, spec


def build_prompt(processor, text: str) -> str:
    """The model's chat prompt with one image and ``text`` (llava-style fallback without a template)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{text} ASSISTANT:"


# ---- rows, resume, shards -----------------------------------------------------------------------------


def read_rows(path: Path) -> dict[str, dict]:
    """Rows already written (a torn last line from a killed run is ignored)."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["key"]] = row
    return rows


def _rewrite_clean(path: Path, rows: dict[str, dict]) -> None:
    """Drop a torn trailing line so appends start on a fresh line."""
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))


def generate_rows(
    model,
    processor,
    samples: list[Sample],
    out_file: Path,
    settings: Settings,
    guard=None,
    desc: str = "generating",
    position: int = 0,
) -> dict[str, dict]:
    """Generate the answer of every sample not yet in ``out_file``; returns all rows."""
    done = read_rows(out_file)
    _rewrite_clean(out_file, done)
    todo = [s for s in samples if s.key not in done]
    generate = guard.generate if guard is not None else model.generate
    device = next(model.parameters()).device
    bar = tqdm(
        total=len(samples),
        initial=len(samples) - len(todo),
        desc=desc,
        unit="sample",
        position=position,
        dynamic_ncols=True,
    )
    with open(out_file, "a") as f:
        for start in range(0, len(todo), settings.batch_size):
            batch, images, rows = [], [], []
            for sample in todo[start : start + settings.batch_size]:
                try:
                    image = sample.load_image()
                    image.load()
                    images.append(image.convert("RGB"))
                    batch.append(sample)
                except Exception as err:  # a missing or corrupt image is an error row
                    rows.append(
                        {
                            "key": sample.key,
                            "image_id": sample.image_id,
                            **sample.meta,
                            "error": f"{type(err).__name__}: {err}",
                        }
                    )
            if batch:
                texts = [build_prompt(processor, s.prompt) for s in batch]
                enc = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
                torch.manual_seed(settings.seed + start)
                with torch.no_grad():
                    ids = generate(**enc, **settings.generate_kwargs())
                outputs = processor.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                rows += [
                    {"key": s.key, "image_id": s.image_id, **s.meta, "output": o.strip()}
                    for s, o in zip(batch, outputs)
                ]
            for row in rows:
                f.write(json.dumps(row) + "\n")
                done[row["key"]] = row
            f.flush()
            bar.update(len(rows))
    bar.close()
    return done


def run_sharded(samples: list[Sample], out_dir: Path, work: Callable[[list[Sample], Path], Any]) -> list[dict] | None:
    """Give each process its shard; on process 0 return all rows in sample order, elsewhere None."""
    from accelerate import PartialState

    state = PartialState()
    world, rank = state.num_processes, state.process_index
    out_file = out_dir / ("samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
    work(samples[rank::world], out_file)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows: dict[str, dict] = {}
    for path in sorted(out_dir.glob("samples*.jsonl")):
        rows.update(read_rows(path))
    missing = [s.key for s in samples if s.key not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} samples have no row (first: {missing[:3]})")
    return [rows[s.key] for s in samples]


# ---- data --------------------------------------------------------------------------------------------------


def coco_file_name(image_id: int) -> str:
    return f"COCO_val2014_{int(image_id):012d}.jpg"


def _open_image(path: Path) -> Callable[[], Any]:
    def load():
        from PIL import Image

        return Image.open(path)

    return load


def chair_image_ids(spec: str, count: int, seed: int, gt: dict) -> list[int]:
    """``opera`` (the 500 standard ids), ``seeded`` (a seeded sample of val2014-like ids), or a file."""
    if spec == "opera":
        return chair_lib.opera_500_ids()[:count]
    if spec == "seeded":
        return random.Random(seed).sample(sorted(gt), count)
    return [int(x) for x in Path(spec).read_text().split()][:count]


def testbed_scenes(split: str, count: int, seed: int):
    from ..testbed import world

    return list(world.scenes(split, count, seed))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def method_record(guard) -> list[dict]:
    return [m.config.to_dict() for m in guard.methods] if guard is not None else []


def package_version() -> str:
    from .. import __version__

    return __version__


# ---- tasks -----------------------------------------------------------------------------------------------------


def run_chair(
    model,
    processor,
    model_name: str,
    out_dir: Path,
    guard=None,
    *,
    dataset: str = "coco",
    coco_images: str | None = None,
    image_ids: str = "opera",
    num_images: int = 500,
    seed: int = 0,
    prompt: str = CHAIR_PROMPT,
    settings: Settings | None = None,
    short: bool = False,
    split: str = "misleading",
) -> dict | None:
    """Caption ``num_images`` images and score them with CHAIR; returns the results on process 0."""
    settings = settings or Settings(max_new_tokens=512)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_files: dict[str, str] = {}
    if dataset == "testbed":
        from ..testbed import world

        scenes = testbed_scenes(split, num_images, seed)
        samples = [Sample(str(s.image_id), s.image_id, s.render, prompt) for s in scenes]
        gt = {s.image_id: set(s.categories) for s in scenes}
        scorer = chair_lib.Chair(synonyms=world.synonyms_text(), gt=gt)
        ids = [s.image_id for s in scenes]
    else:
        if not coco_images:
            raise ValueError("CHAIR on COCO needs --coco-images DIR (the val2014 images)")
        scorer = chair_lib.Chair()
        ids = chair_image_ids(image_ids, num_images, seed, scorer.gt)
        folder = Path(coco_images)
        samples = [Sample(str(i), i, _open_image(folder / coco_file_name(i)), prompt) for i in ids]
        data_files = {"synonyms.txt": sha256(chair_lib.COCO_SYNONYMS), "gt": sha256(chair_lib.COCO_GT)}

    rows = run_sharded(
        samples,
        out_dir,
        lambda shard, path: generate_rows(model, processor, shard, path, settings, guard, desc="CHAIR captions"),
    )
    if rows is None:
        return None
    good = [{"image_id": r["image_id"], "caption": r["output"]} for r in rows if "error" not in r]
    scores = scorer.score(good, short=short) if good else {"n": 0}
    per_caption = scores.pop("captions", [])
    results = {
        "task": "chair",
        "dataset": dataset,
        "split": split if dataset == "testbed" else "val2014",
        "model": model_name,
        "methods": method_record(guard),
        "prompt": prompt,
        "decoding": dataclasses.asdict(settings),
        "short": short,
        "metrics": scores,
        "errors": [r for r in rows if "error" in r],
        "image_ids": ids,
        "data_files": data_files,
        "version": package_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "chair_captions.json").write_text(json.dumps(per_caption, indent=1) + "\n")
    return results


def run_pope(
    model,
    processor,
    model_name: str,
    out_dir: Path,
    guard=None,
    *,
    dataset: str = "coco",
    splits: Iterable[str] = ("random", "popular", "adversarial"),
    coco_images: str | None = None,
    num_questions: int | None = None,
    seed: int = 0,
    rule: str = "pope",
    suffix: str = "",
    settings: Settings | None = None,
    num_images: int = 500,
) -> dict | None:
    """Answer POPE questions and report accuracy, precision, recall, F1 and yes-ratio per split."""
    settings = settings or Settings(max_new_tokens=10)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    data_files: dict[str, str] = {}
    for split in splits:
        if dataset == "testbed":
            questions, loaders = testbed_pope(split, num_images, seed)
        else:
            path = pope_lib.question_file(dataset, split)
            data_files[path.name] = sha256(path)
            questions = pope_lib.read_questions(path)
            if not coco_images:
                raise ValueError(f"POPE on {dataset} needs --coco-images DIR (the images the questions name)")
            loaders = {q["image"]: _open_image(Path(coco_images) / q["image"]) for q in questions}
        if num_questions:
            questions = questions[:num_questions]
        for q in questions:
            samples.append(
                Sample(
                    f"{split}/{q['question_id']}",
                    q["image"],
                    loaders[q["image"]],
                    q["text"] + suffix,
                    {"split": split, "question_id": q["question_id"], "label": q["label"], "question": q["text"]},
                )
            )

    rows = run_sharded(
        samples,
        out_dir,
        lambda shard, path: generate_rows(model, processor, shard, path, settings, guard, desc="POPE answers"),
    )
    if rows is None:
        return None
    metrics = {}
    for split in splits:
        mine = [r for r in rows if r["split"] == split and "error" not in r]
        if not mine:
            continue
        predicted = [pope_lib.parse_answer(r["output"], rule, label=r["label"]) for r in mine]
        metrics[split] = pope_lib.metrics(predicted, [r["label"] for r in mine], answers=[r["output"] for r in mine])
    results = {
        "task": "pope",
        "dataset": dataset,
        "model": model_name,
        "methods": method_record(guard),
        "answer_rule": rule,
        "prompt_suffix": suffix,
        "decoding": dataclasses.asdict(settings),
        "metrics": metrics,
        "errors": [r for r in rows if "error" in r],
        "image_ids": sorted({str(r["image_id"]) for r in rows}),
        "data_files": data_files,
        "version": package_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def testbed_pope(split: str, num_images: int, seed: int) -> tuple[list[dict], dict]:
    """POPE questions on held-out scenes of the synthetic world, as the official files lay them out."""
    import numpy as np

    from ..testbed import world

    scenes = testbed_scenes("test", num_images, seed)
    popularity, cooc = world.category_frequencies(seed=seed), world.cooccurrence(seed=seed)
    rng = np.random.default_rng(
        [seed, 17, world.SPLIT_SEEDS["test"], ("random", "popular", "adversarial").index(split)]
    )
    questions, loaders = [], {}
    for scene in scenes:
        name = world.file_name(scene)
        loaders[name] = scene.render
        for q in world.pope_questions(scene, split, rng, popularity=popularity, cooc=cooc):
            questions.append({"question_id": len(questions) + 1, "image": name, "text": q["text"], "label": q["label"]})
    return questions, loaders


def default_out_dir(task: str, model_name: str, methods: str) -> Path:
    name = Path(model_name.rstrip("/")).name or "model"
    return Path("runs") / f"{task}-{name}-{methods.replace('+', '_') or 'vanilla'}"


__all__ = [
    "CHAIR_PROMPT",
    "Sample",
    "Settings",
    "build_prompt",
    "default_out_dir",
    "generate_rows",
    "load_model",
    "read_rows",
    "run_chair",
    "run_pope",
    "run_sharded",
]
