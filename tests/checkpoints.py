"""Checkpoint folders for every family, built offline: what a user's ``--model <folder>`` reads.

``build_checkpoint(family, folder)`` saves ``tiny_models.build_model(family)`` beside a processor of
the family's real processor class, built from

* the family's real image processor (its PIL backend, which transformers picks without torchvision)
  with the published checkpoint's settings, scaled to the tiny vision tower (``_IMAGE_PROCESSORS``);
* a word-level tokenizer trained here on the prompts and captions the evaluations use, carrying the
  family's special tokens at the ids ``tiny_models`` gives them (``_special_tokens``);
* a chat template written after the published one (``_CHAT_TEMPLATES``; PaliGemma has none).

The saved files name the classes the published checkpoints name (``Qwen2VLImageProcessor``, not its
PIL twin; ``Qwen2VLVideoProcessor``), so loading the folder takes the path a user's download takes.

Where the templates differ from the published ones: llava-1.5's puts a user turn's images before its
text and LLaVA-OneVision's and Idefics3's likewise; ours keep the parts in order (every prompt here
has its image first, so the text is the same). Gemma 3's published template folds a system turn into
the first user turn; ours has no system turn. Qwen2-VL's numbers images when asked
(``add_vision_id``) and renders videos; ours does neither. Nothing here relies on those parts.

Video processors: Qwen2/2.5/3-VL, SmolVLM and LLaVA-OneVision processors take one, and every video
processor class needs torchvision, which is not installed here. The processor is built with
transformers' ``BaseVideoProcessor`` in its place (``compat.without_video``), and the folder records
the family's real video processor class, as published; loading it takes ``compat.load_processor``'s
fallback, as a user's download would without torchvision. Images take the real path.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_models as tm
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.video_processing_utils import BaseVideoProcessor

from halluguard import compat
from halluguard.eval import chair
from halluguard.eval.chair import CHAIR_PROMPT
from halluguard.testbed import world

# Chat-control tokens the templates use, at ids the text tokens never take.
_CONTROL = {
    "<|im_start|>": 4,
    "<|im_end|>": 5,
    "<start_of_turn>": 4,
    "<end_of_turn>": 5,
    "<end_of_utterance>": 6,
    "[INST]": 4,
    "[/INST]": 5,
}
UNK = 3
# Idefics3 / SmolVLM tile positions: <row_i_col_j>, 6 x 6 of them.
ROW_COL_FIRST = 440
TEXT_LAST = ROW_COL_FIRST  # trained words take ids [TEXT_LOW, TEXT_LAST)

# family -> {attribute name on the tokenizer: token} (the image token's attribute is "image_token").
_FAMILY_TOKENS = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "qwen2_vl": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "idefics3": {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    },
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    "paligemma": {"image_token": "<image>"},
}
_FAMILY_TOKENS["qwen2_5_vl"] = _FAMILY_TOKENS["qwen3_vl"] = _FAMILY_TOKENS["qwen2_vl"]
_FAMILY_TOKENS["smolvlm"] = {**_FAMILY_TOKENS["idefics3"], "video_token": "<video>"}
_TOKEN_IDS = {
    "image_token": tm.IMAGE,
    "video_token": tm.VIDEO,
    "vision_start_token": tm.VISION_START,
    "vision_end_token": tm.VISION_END,
    "fake_image_token": tm.FAKE_AROUND_IMAGE,
    "global_image_token": tm.GLOBAL_IMG,
    "boi_token": tm.BOI,
    "eoi_token": tm.EOI,
    "end_of_utterance_token": _CONTROL["<end_of_utterance>"],
}
# Families whose tokenizer puts BOS before a text by itself (the others' templates or processors do).
_ADDS_BOS = ("llava", "llava_next")
# Words, runs of punctuation and each newline are tokens (a newline is one in the published tokenizers,
# and it separates images in several templates).
_WORDS = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)


def _template(prefix: str, turn: dict[str, tuple[str, str]], image: str, answer: str, system: str = "") -> str:
    """A chat template: ``prefix``, then per message ``turn[role]`` around its parts (an image part
    rendered as ``image``), then ``answer`` for the generation prompt; ``system`` opens a
    conversation that has no system turn."""
    opens = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == '{role}' -%}}{{{{- {json.dumps(o)} -}}}}"
        for i, (role, (o, _)) in enumerate(turn.items())
    )
    closes = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == '{role}' -%}}{{{{- {json.dumps(c)} -}}}}"
        for i, (role, (_, c)) in enumerate(turn.items())
    )
    default_system = (
        f"{{%- if messages[0]['role'] != 'system' -%}}{{{{- {json.dumps(system)} -}}}}{{%- endif -%}}" if system else ""
    )
    return (
        f"{prefix}{default_system}"
        "{%- for message in messages -%}"
        f"{opens}{{%- endif -%}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- {json.dumps(image)} -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        f"{closes}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {json.dumps(answer)} -}}}}{{%- endif -%}}"
    )


_QWEN_TURNS = {
    "system": ("<|im_start|>system\n", "<|im_end|>\n"),
    "user": ("<|im_start|>user\n", "<|im_end|>\n"),
    "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
}
_IDEFICS_TURNS = {
    "system": ("System: ", "<end_of_utterance>\n"),
    "user": ("User:", "<end_of_utterance>\n"),
    "assistant": ("Assistant: ", "<end_of_utterance>\n"),
}
_CHAT_TEMPLATES = {
    # llava-hf/llava-1.5-7b-hf
    "llava": _template(
        "",
        {"system": ("", " "), "user": ("USER: ", " "), "assistant": ("ASSISTANT: ", "</s>")},
        "<image>\n",
        "ASSISTANT:",
    ),
    # llava-hf/llava-v1.6-mistral-7b-hf
    "llava_next": _template(
        "", {"system": ("", "\n"), "user": ("[INST] ", " [/INST]"), "assistant": (" ", "</s>")}, "<image>\n", ""
    ),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf
    "llava_onevision": _template(
        "",
        {**_QWEN_TURNS, "user": ("<|im_start|>user ", "<|im_end|>")},
        "<image>\n",
        "<|im_start|>assistant\n",
    ),
    # Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2_vl": _template(
        "",
        _QWEN_TURNS,
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_start|>assistant\n",
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    ),
    # Qwen/Qwen3-VL-8B-Instruct (no default system turn)
    "qwen3_vl": _template("", _QWEN_TURNS, "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n"),
    # HuggingFaceM4/Idefics3-8B-Llama3
    "idefics3": _template("{{- bos_token -}}", _IDEFICS_TURNS, "<image>", "Assistant:"),
    # HuggingFaceTB/SmolVLM-Instruct
    "smolvlm": _template("<|im_start|>", _IDEFICS_TURNS, "<image>", "Assistant:"),
    # google/gemma-3-4b-it
    "gemma3": _template(
        "{{- bos_token -}}",
        {
            "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
            "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"),
        },
        "<start_of_image>",
        "<start_of_turn>model\n",
    ),
}
_CHAT_TEMPLATES["qwen2_5_vl"] = _CHAT_TEMPLATES["qwen2_vl"]

_SQUARE = {"height": 32, "width": 32}  # the tiny towers' image size
_CLIP_NORM = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
_HALF_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
# Qwen: sides a multiple of patch * merge (16 here), 4 to 16 merged tokens per side pair.
_QWEN_SIZE = dict(size={"shortest_edge": 16 * 16 * 4, "longest_edge": 16 * 16 * 16}, patch_size=8, merge_size=2)
# family -> (image processor class, its settings), after the published preprocessor_config.json.
_IMAGE_PROCESSORS = {
    "llava": ("CLIPImageProcessor", dict(size={"shortest_edge": 32}, crop_size=_SQUARE)),
    "llava_next": (
        "LlavaNextImageProcessor",
        dict(size={"shortest_edge": 32}, crop_size=_SQUARE, image_grid_pinpoints=tm._ANYRES_PINPOINTS),
    ),
    "llava_onevision": (
        "LlavaOnevisionImageProcessor",
        dict(size=_SQUARE, image_grid_pinpoints=tm._ANYRES_PINPOINTS, **_HALF_NORM),
    ),
    "qwen2_vl": ("Qwen2VLImageProcessor", dict(**_QWEN_SIZE, temporal_patch_size=2, **_CLIP_NORM)),
    "qwen2_5_vl": ("Qwen2VLImageProcessor", dict(**_QWEN_SIZE, temporal_patch_size=2, **_CLIP_NORM)),
    "qwen3_vl": ("Qwen2VLImageProcessor", dict(**_QWEN_SIZE, temporal_patch_size=2, **_HALF_NORM)),
    # tiles of 48 px (the tower's size), images up to 2 x 2 tiles
    "idefics3": (
        "Idefics3ImageProcessor",
        dict(size={"longest_edge": 96}, max_image_size={"longest_edge": 48}, do_image_splitting=True, **_HALF_NORM),
    ),
    "smolvlm": (
        "SmolVLMImageProcessor",
        dict(size={"longest_edge": 96}, max_image_size={"longest_edge": 48}, do_image_splitting=True, **_HALF_NORM),
    ),
    "gemma3": ("Gemma3ImageProcessor", dict(size=_SQUARE, **_HALF_NORM)),
    "paligemma": ("SiglipImageProcessor", dict(size=_SQUARE, **_HALF_NORM)),
}
# CLIP's 8 px patches plus its CLS token, which the "default" feature strategy drops
_CLIP_PATCHES = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
# family -> (processor class, its settings besides the parts)
_PROCESSORS = {
    "llava": ("LlavaProcessor", _CLIP_PATCHES),
    "llava_next": ("LlavaNextProcessor", _CLIP_PATCHES),
    "llava_onevision": (
        "LlavaOnevisionProcessor",
        dict(num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9"),
    ),
    "qwen2_vl": ("Qwen2VLProcessor", {}),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", {}),
    "qwen3_vl": ("Qwen3VLProcessor", {}),
    "idefics3": ("Idefics3Processor", dict(image_seq_len=9)),
    "smolvlm": ("SmolVLMProcessor", dict(image_seq_len=9)),
    "gemma3": ("Gemma3Processor", dict(image_seq_length=16)),
    "paligemma": ("PaliGemmaProcessor", {}),
}
# family -> the video processor class its published checkpoint names
VIDEO_PROCESSORS = {
    "llava_onevision": "LlavaOnevisionVideoProcessor",
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "smolvlm": "SmolVLMVideoProcessor",
}


def _corpus() -> list[str]:
    """What the tokenizer is trained on: the evaluation prompts, the test world's words and the COCO
    objects of the first standard CHAIR images (so a random model's captions mention objects, some
    of them there, most not)."""
    truth = chair.load_coco_gt()
    coco_objects = sorted({word for i in chair.opera_500_ids()[:200] for word in truth[i]})
    words = list(world.CATEGORIES) + [s for syns in world.SYNONYMS.values() for s in syns] + list(world.COLORS)
    words += coco_objects
    questions = [world.question(c) for c in world.CATEGORIES]
    chat = "User Assistant System You are a helpful assistant . , ! ? : yes no Yes No the a an of and\n"
    return [CHAIR_PROMPT, *questions, " ".join(words), chat]


def _special_tokens(family: str) -> dict[str, int]:
    """Every special token of ``family``'s tokenizer and its id."""
    tokens = {"<pad>": tm.PAD, "<s>": tm.BOS, "</s>": tm.EOS, "<unk>": UNK}
    for name, token in _FAMILY_TOKENS[family].items():
        tokens[token] = _TOKEN_IDS[name]
    template = _CHAT_TEMPLATES.get(family, "")
    tokens.update({token: i for token, i in _CONTROL.items() if token in template})
    if family in ("idefics3", "smolvlm"):
        for n in range(36):
            tokens[f"<row_{n // 6 + 1}_col_{n % 6 + 1}>"] = ROW_COL_FIRST + n
    return tokens


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on :func:`_corpus`, with ``family``'s special tokens; every id
    below the model's vocabulary decodes to a token (unused ones to ``<unused_N>``)."""
    specials = _special_tokens(family)
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>"])
    learner = Tokenizer(models.WordLevel(unk_token="<unk>"))
    learner.normalizer = normalizers.Lowercase()
    learner.pre_tokenizer = _WORDS
    learner.train_from_iterator(_corpus(), trainer=trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    words = [w for w, _ in learned if w not in specials][: TEXT_LAST - tm.TEXT_LOW]
    vocab = dict(specials)
    vocab.update({w: tm.TEXT_LOW + i for i, w in enumerate(words)})
    taken = set(vocab.values())
    vocab.update({f"<unused_{i}>": i for i in range(tm.VOCAB) if i not in taken})

    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = _WORDS
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if family in _ADDS_BOS:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tm.BOS)])
    named = {name: token for name, token in _FAMILY_TOKENS[family].items()}
    named_set = set(named.values())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named,
        padding_side="left",
        model_max_length=4096,
    )
    others = [t for t in specials if t not in named_set and t not in ("<pad>", "<s>", "</s>", "<unk>")]
    tokenizer.add_special_tokens({"additional_special_tokens": list(named_set) + others})
    return tokenizer


def build_processor(family: str):
    """``family``'s real processor class over the parts this module builds."""
    image_name, image_settings = _IMAGE_PROCESSORS[family]
    image_processor = getattr(transformers, image_name + "Pil")(**image_settings)
    if family == "paligemma":
        image_processor.image_seq_length = 16  # published: 256 (224 px / 14 px patches, squared)
    name, settings = _PROCESSORS[family]
    parts = {"image_processor": image_processor, "tokenizer": build_tokenizer(family)}
    if family in VIDEO_PROCESSORS:
        parts["video_processor"] = BaseVideoProcessor()
    if family in _CHAT_TEMPLATES:
        settings = {**settings, "chat_template": _CHAT_TEMPLATES[family]}
    processor_class = getattr(transformers, name)
    if family in VIDEO_PROCESSORS:
        processor_class = compat.without_video(processor_class)
    return processor_class(**parts, **settings)


def build_checkpoint(family: str, folder: Path) -> Path:
    """Save ``family``'s tiny model and processor in ``folder`` (created), as a published checkpoint
    lays them out, and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tm.build_model(family)
    if family == "paligemma":
        _untie_output_embeddings(model)
    model.save_pretrained(folder)
    build_processor(family).save_pretrained(folder)
    _name_published_classes(family, folder)
    return folder


def _untie_output_embeddings(model) -> None:
    """Give a model whose output layer is its input embedding (Gemma's tie) an output layer of its own.

    With tied random weights, the last prompt token's logit dominates and the model only repeats it
    (PaliGemma's prompts end in a newline: every answer would be blank); untied, its random answers
    vary like the other families'."""
    import torch

    for config in (model.config, model.config.get_text_config()):
        config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(1)
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator) * 0.02)
    with torch.no_grad():
        head.weight[tm.EOS].zero_()


def _name_published_classes(family: str, folder: Path) -> None:
    """Record the class names a published checkpoint records: the image processor's default class
    (not the PIL backend it was built with) and the family's video processor."""
    image_name = _IMAGE_PROCESSORS[family][0]
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        changed = _rename(data, "image_processor_type", image_name)
        if family in VIDEO_PROCESSORS:
            changed |= _rename(data, "video_processor_type", VIDEO_PROCESSORS[family])
        if changed:
            path.write_text(json.dumps(data, indent=2) + "\n")


def _rename(data, key: str, value: str) -> bool:
    """Set ``key`` to ``value`` wherever it occurs in nested dicts; whether any was set."""
    if not isinstance(data, dict):
        return False
    found = key in data
    if found:
        data[key] = value
    return any([found] + [_rename(v, key, value) for v in data.values()])


def build_coco_folder(folder: Path, chair_images: int = 8, pope_questions: int = 2) -> Path:
    """A small stand-in for COCO val2014 in ``folder``: noise pictures of assorted sizes under the
    file names of the first ``chair_images`` standard CHAIR ids and of the images the first
    ``pope_questions`` questions of each COCO POPE split name, an ``instances_val2014.json`` with the
    packaged ground truth of the CHAIR images (for ``calibrate lookback``), and ``ids.txt`` listing
    those ids. What ``--coco-images``, ``--annotations`` and ``--image-ids`` read."""
    import numpy as np
    from PIL import Image

    from halluguard.eval import pope
    from halluguard.eval.runner import coco_file_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = chair.opera_500_ids()[:chair_images]
    names = [coco_file_name(i) for i in ids]
    for split in ("random", "popular", "adversarial"):
        names += [q["image"] for q in pope.load_questions("coco", split)[:pope_questions]]
    rng = np.random.default_rng(0)
    for n, name in enumerate(dict.fromkeys(names)):
        height, width = (48, 64, 96)[n % 3], (64, 48, 80)[n % 3]
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    truth = chair.load_coco_gt()
    categories = sorted({word for i in ids for word in truth[i]})
    category_id = {name: k + 1 for k, name in enumerate(categories)}
    annotations = [
        {"id": len(ids) * k + j, "image_id": i, "category_id": category_id[word], "bbox": [0, 0, 8, 8], "area": 64}
        for j, i in enumerate(ids)
        for k, word in enumerate(sorted(truth[i]))
    ]
    instances = {
        "images": [{"id": i, "file_name": coco_file_name(i), "height": 48, "width": 64} for i in ids],
        "annotations": annotations,
        "categories": [{"id": k, "name": name} for name, k in category_id.items()],
    }
    (folder / "instances_val2014.json").write_text(json.dumps(instances))
    (folder / "ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    return folder
