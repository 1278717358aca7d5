"""Train Lookback Lens' classifier for a model, with labels from CHAIR instead of annotators.

    halluguard calibrate lookback --model testbed --out lookback.json                # the test model's world
    halluguard calibrate lookback --model ID --coco-images val2014/ --annotations annotations/ --out lb.json

1. Caption images greedily with ``"lookback"`` in detection mode: every generated token's lookback
   ratios (``L x H``) come with the caption.
2. Find the object mentions of each caption as CHAIR reads them (synonyms, two-word objects,
   normalised words) and label each against the image's ground truth: hallucinated or not. A token is
   hallucinated when it overlaps a hallucinated mention.
3. Examples: each mention (the mean features of its tokens; label 0 = hallucinated, 1 = faithful)
   and every window of ``window`` consecutive tokens (the official sliding-window setting; label 0 when
   any of its tokens is hallucinated).
4. Split by image (80% train, 20% held out), fit scikit-learn's ``LogisticRegression(max_iter=1000)``
   on the training examples of the chosen level (windows by default: the setting the official
   mitigation uses), and report the held-out AUROC at the mention and the window level.
5. Refit on every example of that level, as the official training script does after its held-out
   check, and save that classifier; it carries the held-out AUROCs of step 4.
   (The official check is a two-fold 50/50 split of the examples; here the split is by image, so no
   image's windows are on both sides.)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..eval.chair import CHAIR_PROMPT, Chair
from ..models import encode
from ..outputs import output_file

WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")  # CHAIR's word tokens (its punctuation tokens aside)


def mention_spans(chair: Chair, caption: str) -> list[tuple[int, int, str]]:
    """``(start, end, node word)`` character spans of the object mentions of ``caption``."""
    words = list(WORD.finditer(caption.lower()))
    spans, i = [], 0
    while i < len(words):
        word = chair.normalise(words[i].group())
        if i + 1 < len(words):
            pair = f"{word} {chair.normalise(words[i + 1].group())}"
            if pair in chair.double_words:
                merged = chair.double_words[pair]
                if merged in chair.inverse:
                    spans.append((words[i].start(), words[i + 1].end(), chair.inverse[merged]))
                i += 2
                continue
        if word in chair.inverse:
            spans.append((words[i].start(), words[i].end(), chair.inverse[word]))
        i += 1
    return spans


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it."""
    spans, previous, text = [], 0, ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        spans.append((min(previous, len(text)), len(text)))
        previous = len(text)
    return text, spans


@dataclasses.dataclass
class Examples:
    """Features ``(N, L * H)``, labels ``(N,)`` (1 = faithful) and the image each came from."""

    features: list[torch.Tensor] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    images: list[int] = dataclasses.field(default_factory=list)

    def add(self, features: torch.Tensor, label: int, image: int) -> None:
        self.features.append(features.flatten())
        self.labels.append(label)
        self.images.append(image)

    def subset(self, images: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = [i for i, image in enumerate(self.images) if image in images]
        if not keep:
            return torch.zeros(0), torch.zeros(0)
        return torch.stack([self.features[i] for i in keep]), torch.tensor([self.labels[i] for i in keep])


def caption_examples(
    features: torch.Tensor,
    token_ranges: list[tuple[int, int]],
    mentions: list[tuple[int, int, str]],
    truth: set[str],
    window: int,
    image: int,
    mention_set: Examples,
    window_set: Examples,
) -> None:
    """Add one caption's mention and window examples (``features (T, L, H)``)."""
    faithful = [1] * len(token_ranges)
    for start, end, node in mentions:
        tokens = [t for t, (a, b) in enumerate(token_ranges) if a < end and b > start]
        if not tokens:
            continue
        label = int(node in truth)
        for t in tokens:
            faithful[t] = min(faithful[t], label)
        mention_set.add(features[tokens].mean(0), label, image)
    for t in range(window, len(token_ranges) + 1):
        window_set.add(features[t - window : t].mean(0), min(faithful[t - window : t]), image)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (None when one class is missing)."""
    if len(set(labels.tolist())) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy(), scores.numpy()))


def calibrate(
    model,
    processor,
    images: list,
    image_ids: list[int],
    truth: dict[int, set[str]],
    chair: Chair,
    prompt: str,
    *,
    context: str = "prompt",
    window: int = 8,
    level: str = "window",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    held_out: float = 0.2,
    name: str = "",
    progress: Callable[..., Any] = tqdm,
):
    """Caption, label, train and evaluate (see the module docstring); returns ``(classifier, report)``."""
    from ..methods.lookback.classifier import train_classifier

    if level not in ("window", "mention"):
        raise ValueError(f"level must be 'window' or 'mention', got {level!r}")
    mentions, windows, counts, (num_layers, num_heads) = _caption_examples(
        model, processor, images, image_ids, truth, chair, prompt, context=context, window=window,
        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    train_images, test_images = _split_images(image_ids, held_out)
    examples = windows if level == "window" else mentions
    x, y = examples.subset(train_images)
    if len(set(y.tolist())) < 2:
        raise ValueError(
            f"the training {level}s hold one class only ({len(y)} examples): caption more images "
            "(the model must both hallucinate and not)"
        )
    classifier = train_classifier(x, y, num_layers, num_heads, context=context, model=name, window=window)
    report = dict(counts, train_examples=len(y), level=level, context=context, window=window)
    for kind, data in (("mention", mentions), ("window", windows)):
        xs, ys = data.subset(test_images)
        report[f"held_out_{kind}s"] = len(ys)
        report[f"auroc_{kind}"] = auroc(classifier.faithful_probability(xs), ys) if len(ys) else None
    x_all, y_all = examples.subset(set(image_ids))
    final = train_classifier(x_all, y_all, num_layers, num_heads, context=context, model=name, window=window)
    final.metrics.update({k: report[k] for k in ("auroc_mention", "auroc_window") if report[k] is not None})
    report["final_examples"] = len(y_all)
    return final, report


def _caption_examples(
    model, processor, images, image_ids, truth, chair, prompt, *, context, window, max_new_tokens, batch_size, progress
) -> tuple[Examples, Examples, dict, tuple[int, int]]:
    """Caption ``images`` greedily under Lookback's detector and label each caption's mentions by CHAIR:
    ``(mention examples, window examples, counts, (layers, heads) of the features)``."""
    import halluguard as hg

    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    stop = {*(eos if isinstance(eos, list) else [eos]), tokenizer.pad_token_id} - {None}
    mentions, windows = Examples(), Examples()
    counts = {"captions": 0, "mentions": 0, "hallucinated": 0}
    bar = progress(total=len(images), desc="lookback captions", unit="image")
    with hg.wrap(model, processor, hg.get_config("lookback", context=context)) as guard, torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            enc = encode(processor, [prompt] * len(batch), batch)
            enc = enc.to(next(model.parameters()).device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            generated = out[:, enc["input_ids"].shape[1] :].tolist()
            for row, (ids, detection) in enumerate(zip(generated, guard.results["lookback"])):
                length = next((k for k, t in enumerate(ids) if t in stop), len(ids))
                text, ranges = token_spans(tokenizer, ids[:length])
                image = image_ids[i + row]
                found = mention_spans(chair, text)
                counts["captions"] += 1
                counts["mentions"] += len(found)
                counts["hallucinated"] += sum(node not in truth[image] for *_, node in found)
                caption_examples(
                    detection.features[:length], ranges, found, truth[image], window, image, mentions, windows
                )
            bar.update(len(batch))
    bar.close()
    return mentions, windows, counts, tuple(detection.features.shape[1:])


def _split_images(image_ids: list[int], held_out: float) -> tuple[set[int], set[int]]:
    """``(training images, held-out images)``: a fixed shuffle, ``held_out`` of them (at least one
    image for training) kept out."""
    order = torch.randperm(len(image_ids), generator=torch.Generator().manual_seed(0)).tolist()
    cut = max(1, round(len(order) * (1 - held_out)))
    return {image_ids[k] for k in order[:cut]}, {image_ids[k] for k in order[cut:]}


def main(
    model_spec: str,
    out: str,
    *,
    num_images: int = 500,
    coco_images: str | None = None,
    annotations: str | None = None,
    context: str = "prompt",
    level: str = "window",
    window: int = 8,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
) -> int:
    from ..models import build_prompt, load_model

    try:
        import sklearn  # noqa: F401  (checked before captioning, not after)
    except ImportError:
        raise ValueError(
            "training a lookback classifier needs scikit-learn: pip install 'halluguard[calibrate]'"
        ) from None
    target = output_file(out)
    if coco_images is None and model_spec != "testbed":
        raise ValueError("a model other than the test model needs --coco-images DIR and --annotations DIR")
    coco = _coco_files(coco_images, annotations, num_images) if coco_images is not None else None
    model, processor, name = load_model(model_spec)
    images, ids, truth, chair = _testbed_data(num_images, seed) if coco is None else _coco_data(*coco)
    prompt = build_prompt(processor, CHAIR_PROMPT)
    classifier, report = calibrate(
        model, processor, images, ids, truth, chair, prompt, context=context, window=window, level=level,
        max_new_tokens=max_new_tokens, batch_size=batch_size, name=name,
    )  # fmt: skip
    classifier.save(target)
    show = lambda v: "n/a" if v is None else f"{v:.3f}"
    print(
        f"{name}: {report['captions']} captions, {report['mentions']} mentions ({report['hallucinated']} "
        f"hallucinated); held-out AUROC of the fit on {report['train_examples']} {level}s: mention "
        f"{show(report['auroc_mention'])} ({report['held_out_mentions']}), window {show(report['auroc_window'])} "
        f"({report['held_out_windows']}); refit on all {report['final_examples']} {level}s, saved {target}"
    )
    return 0


def _coco_files(coco_images: str, annotations: str | None, num_images: int) -> tuple[list[Path], dict]:
    """``(image files, ground truth)``: the first ``num_images`` images of the folder that have ground
    truth in the COCO annotations (read before the model loads, so mistakes show at once)."""
    from ..eval.chair import gt_from_coco_annotations

    if annotations is None:
        raise ValueError("--coco-images needs --annotations DIR (COCO instances_*.json)")
    if not Path(coco_images).is_dir():
        raise ValueError(f"--coco-images {coco_images} is not a folder")
    truth = gt_from_coco_annotations(annotations)
    files = sorted(Path(coco_images).glob("*.jpg"))
    picked = [f for f in files if _coco_id(f) in truth][:num_images]
    if not picked:
        raise ValueError(f"no image of {coco_images} has ground truth in {annotations}")
    return picked, truth


def _coco_data(picked: list[Path], truth: dict) -> tuple[list, list[int], dict, Chair]:
    """``(images, image ids, ground truth, CHAIR scorer)`` of the picked COCO images."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in picked]
    return images, [_coco_id(f) for f in picked], truth, Chair(gt=truth)


def _testbed_data(num_images: int, seed: int) -> tuple[list, list[int], dict, Chair]:
    """``(images, image ids, ground truth, CHAIR scorer)`` of the test model's world: its held-out splits,
    far from the scenes the evaluation uses; half misleading (an anchor without its partner: where the
    model hallucinates), half the training distribution."""
    from ..testbed import world

    half = num_images // 2
    scenes = list(world.scenes("misleading", half, seed, start=50_000))
    scenes += list(world.scenes("test", num_images - half, seed, start=50_000))
    truth = {s.image_id: set(s.categories) for s in scenes}
    chair = Chair(synonyms=world.synonyms_text(), gt=truth)
    return [s.render() for s in scenes], [s.image_id for s in scenes], truth, chair


def _coco_id(path: Path) -> int:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else -1
