"""Run CHAIR and POPE: generate with any method composition, write rows as they come, resume.

A run is described by a task (:class:`ChairTask` or :class:`PopeTask`: data, prompt, scoring) and
:class:`Decoding` (generation settings) plus a batch size and a seed (:class:`RunSettings`), and it
goes through one function per stage:

1. ``task_samples`` (``task.prepare``): the samples (one per image or question) and what scoring needs;
2. ``open_run_folder``: the run folder's ``run.json`` records a fingerprint of everything that shapes
   a row (model identity and weights, methods with their full configs, decoding settings, prompt and
   chat template, data files, seed, package version). A rerun resumes only when the fingerprint
   matches; otherwise it stops and names what differs (``overwrite=True`` starts afresh). Batch size,
   device, sample counts, POPE splits, the answer rule and the CHAIR short-regime scoring are not part of
   it: they change which rows are scored or floating-point noise, not what a row means;
3. ``generate_rows``: rows go to ``samples.jsonl`` (``samples.rank<r>.jsonl`` per process when
   sharded), flushed after every batch; rows already there are kept, error rows (a missing or
   unreadable image) are retried. Batches are cut from the whole sample list in order, so a batch
   holds the same samples however the run is split or resumed, and each batch is seeded from the run
   seed and its rows' ids; sampled runs (``do_sample``) generate one row at a time, so each row's draw
   depends only on the run seed and its id. A resumed or sharded run therefore equals an uninterrupted
   one-process run;
4. ``task.score``: metrics over the rows that have an output;
5. ``write_results``: ``results.json`` with the metrics, the failed rows (count and first reasons),
   model, methods, decoding settings, data file hashes, image ids and version.

Sharding: under ``torchrun`` or ``accelerate launch``, process ``r`` of ``W`` takes every ``W``-th
batch from ``r`` (on GPUs or, without CUDA, on CPU processes joined with gloo); process 0 waits for
the others, merges the rows and scores.

Data sources: COCO (``coco_images`` with val2014 file names; ground truth and POPE questions are
packaged) or the shipped test model's synthetic world (``dataset="testbed"``; images are rendered
on the fly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models import build_prompt, encode
from . import chair as chair_lib
from . import pope as pope_lib
from .chair import CHAIR_PROMPT

CHAIR_DATASETS = ("coco", "testbed")
POPE_DATASETS = (*pope_lib.DATASETS, "testbed")
TESTBED_CHAIR_SPLITS = ("misleading", "test", "faint")
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CAPTIONS_FILE = "chair_captions.json"
ROW_FILES = "samples*.jsonl"
FAILED_SHOWN = 5  # failed rows listed in results.json and on the console


class EvalError(Exception):
    """A run that cannot start, go on or be scored; the message says why and what to do."""


# ---- settings ------------------------------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Decoding:
    """Generation settings (all of them shape a row)."""

    max_new_tokens: int
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        _check(int(self.max_new_tokens) >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(int(self.num_beams) >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")

    def labels(self) -> list[str]:
        """What sets this decoding apart from greedy search, for a run's folder name: ``beams5``,
        ``sampled``, ``t0.9``, ``p0.95``."""
        labels = [f"beams{self.num_beams}"] if self.num_beams > 1 else []
        if self.do_sample:
            labels.append("sampled")
            labels += [f"t{self.temperature:g}"] if self.temperature != 1.0 else []
            labels += [f"p{self.top_p:g}"] if self.top_p != 1.0 else []
        return labels

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kwargs


@dataclasses.dataclass(frozen=True)
class RunSettings:
    decoding: Decoding
    batch_size: int = 8
    seed: int = 0
    system_prompt: str = ""  # a system turn before each prompt (none when empty)
    llava_layout: str = ""  # an official script's exact LLaVA-1.5 conversation (see ``row_prompt``)
    preset: dict | None = None  # the official run's preset these settings follow (recorded, not compared)

    def __post_init__(self):
        _check(int(self.batch_size) >= 1, f"batch_size must be >= 1, got {self.batch_size}")


# ---- samples ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    key: str  # unique id of the row
    image_id: Any
    load_image: Callable[[], Any]  # -> PIL image (may raise)
    prompt: str
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Prepared:
    """What a task needs to generate and score: samples, scorer, data file hashes, image ids."""

    samples: list[Sample]
    data_files: dict[str, str]
    image_ids: list
    scorer: Any = None  # CHAIR: a chair.Chair
    extra: Any = None  # CHAIR: scored captions -> further metrics (the testbed's partner rate)


def coco_file_name(image_id: int) -> str:
    return f"COCO_val2014_{int(image_id):012d}.jpg"


def _open_image(path: Path) -> Callable[[], Any]:
    def load():
        from PIL import Image

        return Image.open(path)

    return load


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def chair_image_ids(spec: str, count: int, seed: int, gt: dict) -> list[int]:
    """``opera`` (the 500 standard ids), ``seeded`` (a seeded sample of the ground truth's ids), or a
    file of ids; every id must have ground truth."""
    if spec == "opera":
        ids = chair_lib.opera_500_ids()[:count]
    elif spec == "seeded":
        ids = random.Random(seed).sample(sorted(gt), min(count, len(gt)))
    else:
        ids = _image_ids_file(spec)[:count]
    unknown = [i for i in ids if i not in gt]
    if unknown:
        raise EvalError(f"{len(unknown)} image ids have no COCO-2014 ground truth (first: {unknown[:3]})")
    return ids


def _image_ids_file(spec: str) -> list[int]:
    """The image ids a file lists (whitespace-separated, each once)."""
    path = Path(spec)
    if not path.is_file():
        raise EvalError(f"image ids: {spec!r} is neither 'opera', 'seeded' nor a file of ids")
    ids = []
    for number, word in enumerate(path.read_text().split(), 1):
        try:
            ids.append(int(word))
        except ValueError:
            raise EvalError(f"{spec}: item {number} ({word!r}) is not an image id") from None
    if not ids:
        raise EvalError(f"{spec} holds no image ids")
    if len(set(ids)) != len(ids):
        raise EvalError(f"{spec} names an image twice (ids must be unique)")
    return ids


def _partner_rate(scenes: list) -> Callable[[list[dict]], dict]:
    """Scored captions of ``scenes`` (each built around one anchor) -> ``{"partner_named": percent}``,
    how often a caption names the anchor's partner, which the scene leaves out."""
    from ..testbed.evaluate import partner_named

    by_id = {s.image_id: s for s in scenes}

    def extra(good: list[dict]) -> dict:
        named = partner_named([by_id[g["image_id"]] for g in good], [g["caption"] for g in good])
        return {"partner_named": named}

    return extra


def _nothing_scored(rows: list[dict], what: str) -> EvalError:
    reasons = "; ".join(r["error"] for r in rows[:2] if "error" in r)
    return EvalError(f"no {what} could be scored: all {len(rows)} rows failed ({reasons}); fix the data and rerun")


# ---- tasks -----------------------------------------------------------------------------------------------
# A task knows its data (``prepare``), how its rows are scored (``score``), what of it a run's results
# and fingerprint record (``result_fields``, ``recorded_prompt``) and how its progress bar is labelled.


@dataclasses.dataclass(frozen=True)
class ChairTask:
    """Caption images and score them with CHAIR."""

    dataset: str = "coco"  # coco | testbed
    num_images: int = 500
    split: str = "misleading"  # testbed: the world's split
    image_ids: str = "opera"  # coco: opera (the standard 500) | seeded | a file of ids
    coco_images: str | None = None  # coco: folder of val2014 images
    prompt: str = CHAIR_PROMPT
    short: bool = False  # 64-token regime: drop a last unfinished sentence before scoring

    name = "chair"
    progress_label = "CHAIR captions"

    @property
    def default_max_new_tokens(self) -> int:
        """512 on COCO (OPERA's long captions), 64 in the short regime and on the test model's world
        (its captions are about 30 words, and its 256 positions hold a prompt and 64 more tokens)."""
        return 64 if self.short or self.dataset == "testbed" else 512

    def __post_init__(self):
        _check(self.dataset in CHAIR_DATASETS, f"unknown CHAIR dataset {self.dataset!r}; choose from {CHAIR_DATASETS}")
        _check(int(self.num_images) >= 1, f"num_images must be >= 1, got {self.num_images}")
        if self.dataset == "testbed":
            _check(
                self.split in TESTBED_CHAIR_SPLITS,
                f"unknown testbed split {self.split!r}; choose from {', '.join(TESTBED_CHAIR_SPLITS)}",
            )
        else:
            _check(bool(self.coco_images), "CHAIR on COCO needs coco_images (the folder of val2014 images)")
        _check(bool(self.prompt.strip()), "the CHAIR prompt is empty")

    @property
    def data_label(self) -> str:
        return f"testbed {self.split}" if self.dataset == "testbed" else "coco val2014"

    @property
    def recorded_prompt(self) -> str:
        """The prompt a run's fingerprint records: the caption prompt."""
        return self.prompt

    def prepare(self, seed: int) -> Prepared:
        """The images to caption, a CHAIR scorer with their ground truth, and the data files' hashes."""
        return self._prepare_testbed(seed) if self.dataset == "testbed" else self._prepare_coco(seed)

    def _prepare_testbed(self, seed: int) -> Prepared:
        """Scenes of the test model's world, rendered on the fly; off the ``test`` split (scenes built
        around one anchor) the results also give how often the anchor's partner is named."""
        from ..testbed import world

        scenes = list(world.scenes(self.split, self.num_images, seed))
        samples = [Sample(str(s.image_id), s.image_id, s.render, self.prompt) for s in scenes]
        gt = {s.image_id: set(s.categories) for s in scenes}
        scorer = chair_lib.Chair(synonyms=world.synonyms_text(), gt=gt)
        data_files = {"synonyms": hashlib.sha256(world.synonyms_text().encode()).hexdigest()}
        extra = _partner_rate(scenes) if self.split != "test" else None
        return Prepared(samples, data_files, [s.image_id for s in scenes], scorer, extra)

    def _prepare_coco(self, seed: int) -> Prepared:
        """COCO val2014 images of the chosen ids, scored against the packaged ground truth."""
        scorer = chair_lib.Chair()
        ids = chair_image_ids(self.image_ids, self.num_images, seed, scorer.gt)
        folder = Path(self.coco_images)
        samples = [Sample(str(i), i, _open_image(folder / coco_file_name(i)), self.prompt) for i in ids]
        data_files = {"synonyms.txt": sha256(chair_lib.COCO_SYNONYMS), "gt": sha256(chair_lib.COCO_GT)}
        return Prepared(samples, data_files, ids, scorer)

    def score(self, prepared: Prepared, rows: list[dict]) -> tuple[dict, list[dict] | None]:
        """(CHAIR metrics, per-caption details) over the rows with a caption."""
        good = [{"image_id": r["image_id"], "caption": r["output"]} for r in rows if "error" not in r]
        if not good:
            raise _nothing_scored(rows, "caption")
        scores = prepared.scorer.score(good, short=self.short)
        captions = scores.pop("captions")
        if prepared.extra is not None:
            scores.update(prepared.extra(good))
        return scores, captions

    def result_fields(self) -> dict:
        """What of the task a run's ``results.json`` records besides its name and dataset."""
        return {
            "split": self.split if self.dataset == "testbed" else "val2014",
            "prompt": self.prompt,
            "short": self.short,
            "image_ids_from": self.image_ids if self.dataset == "coco" else "scenes",
        }


@dataclasses.dataclass(frozen=True)
class PopeTask:
    """Answer POPE yes/no questions; accuracy, precision, recall, F1 and yes-ratio per split."""

    dataset: str = "coco"  # coco | aokvqa | gqa | testbed
    splits: tuple[str, ...] = pope_lib.SPLITS
    num_images: int = 500  # testbed: held-out scenes (6 questions each)
    num_questions: int | None = None  # first N questions per split (None: all)
    coco_images: str | None = None
    answer_rule: str = "pope"
    prompt_suffix: str = ""

    name = "pope"
    progress_label = "POPE answers"
    default_max_new_tokens = 10

    def __post_init__(self):
        object.__setattr__(self, "splits", tuple(self.splits))
        _check(self.dataset in POPE_DATASETS, f"unknown POPE dataset {self.dataset!r}; choose from {POPE_DATASETS}")
        _check(len(self.splits) >= 1, "no POPE split chosen")
        for split in self.splits:
            _check(split in pope_lib.SPLITS, f"unknown POPE split {split!r}; choose from {', '.join(pope_lib.SPLITS)}")
        _check(len(set(self.splits)) == len(self.splits), f"a POPE split is named twice: {list(self.splits)}")
        _check(int(self.num_images) >= 1, f"num_images must be >= 1, got {self.num_images}")
        if self.num_questions is not None:
            _check(
                int(self.num_questions) >= 1, f"num_questions must be >= 1 (or None for all), got {self.num_questions}"
            )
        _check(
            self.answer_rule in pope_lib.RULES,
            f"unknown answer rule {self.answer_rule!r}; choose from {pope_lib.RULES}",
        )
        if self.dataset != "testbed":
            _check(bool(self.coco_images), f"POPE on {self.dataset} needs coco_images (the images the questions name)")

    @property
    def data_label(self) -> str:
        return self.dataset

    @property
    def recorded_prompt(self) -> str:
        """The prompt a run's fingerprint records: the suffix added to every question."""
        return self.prompt_suffix

    def prepare(self, seed: int) -> Prepared:
        """The questions of every split (the first ``num_questions`` of each) and the data files' hashes."""
        samples: list[Sample] = []
        data_files: dict[str, str] = {}
        for split in self.splits:
            questions, loaders = self._questions(split, seed, data_files)
            for q in questions[: self.num_questions]:
                meta = {"split": split, "question_id": q["question_id"], "label": q["label"], "question": q["text"]}
                key, prompt = f"{split}/{q['question_id']}", q["text"] + self.prompt_suffix
                samples.append(Sample(key, q["image"], loaders[q["image"]], prompt, meta))
        return Prepared(samples, data_files, sorted({str(s.image_id) for s in samples}))

    def _questions(self, split: str, seed: int, data_files: dict[str, str]) -> tuple[list[dict], dict]:
        """A split's questions and a loader per image file name; an official question file's hash goes
        into ``data_files``."""
        if self.dataset == "testbed":
            from ..testbed.evaluate import pope_question_file

            return pope_question_file(split, self.num_images, seed)
        path = pope_lib.question_file(self.dataset, split)
        data_files[path.name] = sha256(path)
        questions = pope_lib.read_questions(path)
        return questions, {q["image"]: _open_image(Path(self.coco_images) / q["image"]) for q in questions}

    def score(self, prepared: Prepared, rows: list[dict]) -> tuple[dict, list[dict] | None]:
        """(metrics per split, no details) over the rows with an answer (a split whose rows all failed
        is left out)."""
        metrics = {}
        for split in self.splits:
            mine = [r for r in rows if r["split"] == split and "error" not in r]
            if mine:
                predicted = [pope_lib.parse_answer(r["output"], self.answer_rule, label=r["label"]) for r in mine]
                metrics[split] = pope_lib.metrics(
                    predicted, [r["label"] for r in mine], answers=[r["output"] for r in mine]
                )
        if not metrics:
            raise _nothing_scored(rows, "answer")
        return metrics, None

    def result_fields(self) -> dict:
        """What of the task a run's ``results.json`` records besides its name and dataset."""
        return {"splits": list(self.splits), "answer_rule": self.answer_rule, "prompt_suffix": self.prompt_suffix}


Task = ChairTask | PopeTask


def task_samples(task: Task, seed: int) -> Prepared:
    """``task.prepare(seed)``, refused when it holds no sample."""
    prepared = task.prepare(seed)
    if not prepared.samples:
        raise EvalError(f"the {task.name.upper()} run has no samples ({task.data_label})")
    return prepared


# ---- models --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str  # as the user named it: "testbed", a hub id or a path
    identity: dict  # what makes its outputs: path or id, weights hash or revision, dtype


def folder_hash(folder: Path) -> str:
    """sha256 over a model folder's files (names, sizes, and the first and last 16 MiB of each, so
    all of a small file): weights, config, tokenizer and processor files; notes (``*.md``) excluded."""
    digest = hashlib.sha256()
    chunk = 16 << 20
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".md"):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as f:
            digest.update(f.read(chunk))
            if size > 2 * chunk:
                f.seek(size - chunk)
            digest.update(f.read(chunk))
    return digest.hexdigest()


def model_info(model, name: str | None = None) -> ModelInfo:
    """Identity of a loaded model: the hash of its local folder (wherever it lies), or hub id and revision."""
    name = name or getattr(model, "name_or_path", None) or type(model).__name__
    source = str(getattr(model, "name_or_path", "") or name)
    identity: dict[str, Any] = {"class": type(model).__name__, "dtype": str(getattr(model, "dtype", ""))}
    folder = Path(source).expanduser()
    if folder.is_dir():
        identity["files"] = folder_hash(folder)
    else:
        identity.update(id=source, revision=getattr(getattr(model, "config", None), "_commit_hash", None))
    return ModelInfo(name, identity)


def method_record(guard) -> list[dict]:
    return [m.config.to_dict() for m in guard.methods] if guard is not None else []


def package_version() -> str:
    from .._version import __version__

    return __version__


# ---- processes -------------------------------------------------------------------------------------------

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LAUNCH_HELP = (
    "launch with `torchrun --nproc_per_node N -m halluguard.cli ...` or "
    "`accelerate launch --multi_gpu --num_processes N -m halluguard.cli ...` (both also run on CPU)"
)


@dataclasses.dataclass
class Shard:
    """This process's place among the launched ones (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate.PartialState when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def _env_int(names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return name, int(value)
            except ValueError:
                raise EvalError(f"cannot read the launcher's world: {name}={value!r} is not an integer") from None
    return None


def launcher_shard() -> Shard:
    """The process world a launcher set up (torchrun, accelerate launch, mpirun), joined through
    accelerate: NCCL on GPUs, gloo on CPU processes. Refuses a world it cannot read."""
    world = _env_int(_WORLD_VARS)
    rank = _env_int(_RANK_VARS)
    if world is None:
        if rank is not None:
            raise EvalError(f"cannot read the launcher's world: {rank[0]} is set but no WORLD_SIZE; {LAUNCH_HELP}")
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and "MASTER_ADDR" in os.environ:
            raise EvalError(
                "`accelerate launch --cpu --num_processes N` starts a single process on this machine "
                f"(several CPU processes need mpirun); {LAUNCH_HELP}"
            )
        return Shard()
    if world[1] < 1:
        raise EvalError(f"cannot read the launcher's world: {world[0]}={world[1]}")
    if world[1] == 1:
        return Shard()
    if rank is None:
        raise EvalError(f"cannot read the launcher's world: {world[0]}={world[1]} but no RANK; {LAUNCH_HELP}")
    if not 0 <= rank[1] < world[1]:
        raise EvalError(f"cannot read the launcher's world: rank {rank[1]} of {world[1]}")
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if (state.process_index, state.num_processes) != (rank[1], world[1]):
        raise EvalError(
            f"the launcher set rank {rank[1]} of {world[1]}, but accelerate joined rank {state.process_index} "
            f"of {state.num_processes}; {LAUNCH_HELP}"
        )
    return Shard(rank[1], world[1], state)


# ---- the run folder: fingerprint, resume, overwrite ------------------------------------------------------


def run_identity(task: Task, settings: RunSettings, info: ModelInfo, guard, processor, data_files: dict) -> dict:
    """Everything that shapes a row; its hash is the run's fingerprint."""
    return {
        "task": task.name,
        "dataset": task.dataset,
        "model": info.identity,
        "methods": {c["method"]: c for c in method_record(guard)},
        "decoding": dataclasses.asdict(settings.decoding),
        "prompt": task.recorded_prompt,
        "prompt_template": row_prompt(processor, "{text}", settings),
        "seed": settings.seed,
        "data": data_files,
        "version": package_version(),
    }


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def settings_diff(old: dict, new: dict, limit: int = 4) -> str:
    """``"decoding.max_new_tokens: 512 -> 3; methods.pai.alpha: 0.5 -> 5.0"`` (the first ``limit``)."""
    a, b = _flatten(old), _flatten(new)
    names = [sorted(d.get("methods") or {}) for d in (old, new)]
    if names[0] != names[1]:  # other methods: name them rather than list their fields
        a = {k: v for k, v in a.items() if not k.startswith("methods")} | {"methods": "+".join(names[0]) or "none"}
        b = {k: v for k, v in b.items() if not k.startswith("methods")} | {"methods": "+".join(names[1]) or "none"}
    missing = object()
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    parts = [
        f"{k}: {_short(a[k]) if k in a else '(none)'} -> {_short(b[k]) if k in b else '(none)'}"
        for k in changed[:limit]
    ]
    if len(changed) > limit:
        parts.append(f"and {len(changed) - limit} more")
    return "; ".join(parts)


def _owned_files(out_dir: Path) -> list[Path]:
    return [p for p in (out_dir / RUN_FILE, out_dir / RESULTS_FILE, out_dir / CAPTIONS_FILE) if p.exists()] + sorted(
        out_dir.glob(ROW_FILES)
    )


def open_run_folder(out_dir: Path, identity: dict, shard: Shard, overwrite: bool = False) -> None:
    """Make sure ``out_dir`` belongs to these settings: create it, resume it, or (``overwrite``) clear
    it; refuse rows made with other settings. Every process checks before process 0 writes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"run folder {out_dir} is a file")
    run_file = out_dir / RUN_FILE
    if not overwrite and out_dir.is_dir():
        hint = "pass --out DIR for a new run, or --overwrite to replace this one"
        if run_file.exists():
            try:
                recorded = json.loads(run_file.read_text())
                old = recorded["settings"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalError(f"{run_file} is unreadable; {hint}") from None
            if recorded.get("fingerprint") != fingerprint(identity):
                raise EvalError(
                    f"{out_dir} holds rows made with other settings ({settings_diff(old, identity)}); {hint}"
                )
        elif any(out_dir.glob(ROW_FILES)):
            raise EvalError(f"{out_dir} holds rows but no {RUN_FILE} (made by an older version?); {hint}")
    shard.barrier()
    if shard.main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if overwrite:
                for path in _owned_files(out_dir):
                    path.unlink()
            record = {"fingerprint": fingerprint(identity), "settings": identity}
            tmp = out_dir / f".{RUN_FILE}.tmp"
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
            tmp.replace(run_file)
        except OSError as err:
            raise EvalError(f"cannot write the run folder {out_dir}: {err.strerror or err}") from None
    shard.barrier()


# ---- rows ------------------------------------------------------------------------------------------------


def _better(old: dict | None, new: dict) -> bool:
    """A row with an output beats an error row; otherwise the later one wins."""
    return old is None or "error" in old or "error" not in new


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of one file (unparseable lines, such as a line torn by a kill, are skipped)."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("key"), str) and _better(rows.get(row["key"]), row):
            rows[row["key"]] = row
    return rows


def read_all_rows(out_dir: Path) -> dict[str, dict]:
    """Rows of every process's file in ``out_dir``."""
    rows: dict[str, dict] = {}
    for path in sorted(out_dir.glob(ROW_FILES)):
        for key, row in read_rows(path).items():
            if _better(rows.get(key), row):
                rows[key] = row
    return rows


def row_file(out_dir: Path, shard: Shard) -> Path:
    return out_dir / ("samples.jsonl" if shard.world == 1 else f"samples.rank{shard.rank}.jsonl")


def row_seed(seed: int, key: str) -> int:
    """The seed of a row (or of a batch, keys joined by ``|``): from the run seed and the row ids only."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "big") >> 1


def batches(samples: list[Sample], settings: RunSettings) -> list[list[Sample]]:
    """Batches cut from the whole sample list in order (one row each when sampling)."""
    size = 1 if settings.decoding.do_sample else settings.batch_size
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def row_prompt(processor, text: str, settings: RunSettings) -> str:
    """A row's prompt: the processor's chat prompt for ``text`` and one image, after the run's system
    prompt. A run that follows an official script's own LLaVA-1.5 conversation (``llava_layout``,
    with ``{system}``, ``{image}`` and ``{text}``) uses it on a processor that renders LLaVA-1.5's
    conversation (``USER: <image>\n{text} ASSISTANT:``), so the prompt is the script's to the token."""
    if settings.llava_layout:
        image = getattr(processor, "image_token", None) or "<image>"
        if build_prompt(processor, "{text}") == f"USER: {image}\n{{text}} ASSISTANT:":
            return settings.llava_layout.format(system=settings.system_prompt, image=image, text=text)
    return build_prompt(processor, text, settings.system_prompt)


def _same_sample(row: dict, sample: Sample) -> bool:
    return row.get("image_id") == sample.image_id and all(row.get(k) == v for k, v in sample.meta.items())


def _produce(model, processor, generate, batch: list[Sample], settings: RunSettings) -> list[dict]:
    """Rows of one batch: an output per sample, or an error row when its image cannot be read."""
    import torch

    good, images, rows = [], [], []
    for sample in batch:
        try:
            image = sample.load_image()
            image.load()
            images.append(image.convert("RGB"))
            good.append(sample)
        except Exception as err:  # a missing or corrupt image is an error row
            rows.append(
                {"key": sample.key, "image_id": sample.image_id, **sample.meta, "error": f"{type(err).__name__}: {err}"}
            )
    if good:
        device = next(model.parameters()).device
        prompts = [row_prompt(processor, s.prompt, settings) for s in good]
        enc = encode(processor, prompts, images)
        torch.manual_seed(row_seed(settings.seed, "|".join(s.key for s in good)))
        with torch.no_grad():
            ids = generate(**enc.to(device), **settings.decoding.generate_kwargs())
        outputs = processor.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rows += [{"key": s.key, "image_id": s.image_id, **s.meta, "output": o.strip()} for s, o in zip(good, outputs)]
    return rows


def generate_rows(
    model,
    processor,
    guard,
    samples: list[Sample],
    out_dir: Path,
    settings: RunSettings,
    shard: Shard,
    desc: str,
    checkpoint: Callable[[], None] | None = None,
) -> None:
    """Generate this process's batches that are not done yet (error rows are retried); ``checkpoint``
    is called before each batch."""
    from tqdm import tqdm

    done = read_all_rows(out_dir)
    shard.barrier()  # every process has read before any rewrites its file
    for sample in samples:
        row = done.get(sample.key)
        if row is not None and not _same_sample(row, sample):
            raise EvalError(
                f"row {sample.key!r} in {out_dir} was made for another sample; "
                "pass --out DIR for a new run, or --overwrite to replace this one"
            )
    out_file = row_file(out_dir, shard)
    mine = [b for i, b in enumerate(batches(samples, settings)) if i % shard.world == shard.rank]
    todo = [[s for s in b if s.key not in done or "error" in done[s.key]] for b in mine]
    todo = [b for b in todo if b]
    kept = {k: r for k, r in read_rows(out_file).items() if "error" not in r}
    out_file.write_text("".join(json.dumps(r) + "\n" for r in kept.values()))  # drop torn lines and errors
    total = sum(len(b) for b in mine)
    generate = guard.generate if guard is not None else model.generate
    bar = tqdm(
        total=total,
        initial=total - sum(len(b) for b in todo),
        desc=desc if shard.world == 1 else f"{desc} [{shard.rank}/{shard.world}]",
        unit="sample",
        position=shard.rank,
        dynamic_ncols=True,
    )
    with bar, open(out_file, "a") as f:  # the bar ends its line even when interrupted
        for batch in todo:
            if checkpoint is not None:
                checkpoint()
            rows = _produce(model, processor, generate, batch, settings)
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            bar.update(len(rows))


def collect_rows(out_dir: Path, samples: list[Sample]) -> list[dict]:
    """Every sample's row, in sample order (process 0, after all processes finished)."""
    rows = read_all_rows(out_dir)
    missing = [s.key for s in samples if s.key not in rows]
    if missing:
        raise EvalError(f"{len(missing)} samples have no row in {out_dir} (first: {missing[:3]})")
    return [rows[s.key] for s in samples]


# ---- scoring and results ---------------------------------------------------------------------------------


def failed_summary(rows: list[dict]) -> dict:
    failed = [r for r in rows if "error" in r]
    return {
        "count": len(failed),
        "first": [{"key": r["key"], "image_id": r["image_id"], "error": r["error"]} for r in failed[:FAILED_SHOWN]],
    }


def write_results(out_dir: Path, results: dict, captions: list[dict] | None = None) -> None:
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if captions is not None:
        (out_dir / CAPTIONS_FILE).write_text(json.dumps(captions, indent=1) + "\n")


def evaluate(
    task: Task,
    model,
    processor,
    out_dir: str | Path,
    guard=None,
    settings: RunSettings | None = None,
    info: ModelInfo | None = None,
    shard: Shard | None = None,
    overwrite: bool = False,
    prepared: Prepared | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> dict | None:
    """Run ``task`` into ``out_dir`` (resuming it); the results on process 0, ``None`` elsewhere.
    ``prepared``: the task's samples, if ``task_samples`` was called already; ``checkpoint``: called
    before every batch (it raises to stop the run, e.g. ``Interrupts.check``).

    Raises :class:`EvalError` when the folder belongs to other settings or nothing could be scored.
    Failed rows (``results["failed"]``) leave the run incomplete (``results["complete"]`` false);
    rerunning retries them.
    """
    out_dir = Path(out_dir)
    settings = settings or RunSettings(Decoding(task.default_max_new_tokens))
    info = info or model_info(model)
    shard = shard or Shard()
    prepared = prepared or task_samples(task, settings.seed)
    identity = run_identity(task, settings, info, guard, processor, prepared.data_files)
    open_run_folder(out_dir, identity, shard, overwrite)
    generate_rows(model, processor, guard, prepared.samples, out_dir, settings, shard, task.progress_label, checkpoint)
    shard.barrier()
    if not shard.main:
        return None
    rows = collect_rows(out_dir, prepared.samples)
    metrics, captions = task.score(prepared, rows)
    results = results_record(task, settings, info, guard, shard, prepared, rows, metrics, identity)
    write_results(out_dir, results, captions)
    return results


def results_record(
    task: Task,
    settings: RunSettings,
    info: ModelInfo,
    guard,
    shard: Shard,
    prepared: Prepared,
    rows: list[dict],
    metrics: dict,
    identity: dict,
) -> dict:
    """What ``results.json`` holds: the task, model, methods and settings (and the preset they came
    from, if any), the metrics over ``rows``, the failed rows, the data and the version."""
    failed = failed_summary(rows)
    return {
        "task": task.name,
        "dataset": task.dataset,
        **task.result_fields(),
        "model": info.name,
        "model_identity": info.identity,
        "methods": method_record(guard),
        "decoding": dataclasses.asdict(settings.decoding),
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "system_prompt": settings.system_prompt,
        "prompt_template": identity["prompt_template"],
        **({"preset": settings.preset} if settings.preset else {}),
        "processes": shard.world,
        "metrics": metrics,
        "samples": len(rows),
        "failed": failed,
        "complete": failed["count"] == 0,
        "image_ids": prepared.image_ids,
        "data_files": prepared.data_files,
        "fingerprint": fingerprint(identity),
        "version": package_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def default_out_dir(task: Task, model_name: str, methods: str, decoding: Decoding) -> Path:
    """``runs/<task>-<data>-<model>-<methods>[-<decoding>]``, e.g. ``runs/chair-testbed-misleading-testbed-pai``
    or, beside it, ``...-vanilla-beams5`` and ``...-vcd-sampled``: runs that decode differently get
    folders of their own (greedy search names none)."""
    name = Path(model_name.rstrip("/")).name or "model"
    data = task.data_label.replace(" ", "-")
    folder = f"{task.name}-{data}-{name}-{methods.replace('+', '_') or 'vanilla'}"
    return Path("runs") / "-".join([folder, *decoding.labels()])


__all__ = [
    "ChairTask",
    "Decoding",
    "EvalError",
    "ModelInfo",
    "PopeTask",
    "RunSettings",
    "Sample",
    "Shard",
    "default_out_dir",
    "evaluate",
    "launcher_shard",
    "model_info",
    "read_rows",
    "row_seed",
]
