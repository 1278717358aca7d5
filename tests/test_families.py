"""Every family end to end through its real processor, from a checkpoint folder built offline
(``checkpoints.build_checkpoint``: the tiny model of the real class, the family's real processor
class with its image processor, a tokenizer trained here and the family's chat template).

Per family: the adapter's image spans equal, per row, the runs of the processor's image tokens
(several images per prompt where the family takes them, assorted sizes for AnyRes grids, tiles and
Qwen's patch grids, left padding), and the model accepts those inputs; then the commands a user
types first, on that folder: ``eval pope`` and ``eval chair`` (batch 2) with a method of each kind
(attention-level PAI, contrastive VCD, loop owners OPERA and Lookback Lens), ``demo --compare``,
``bench`` and ``calibrate lookback``. The lmms-eval route is in ``test_lmms_eval.py``. The core
families run in the quick suite, the others in the slow one."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from checkpoints import VIDEO_PROCESSORS, build_coco_folder
from PIL import Image
from tiny_models import FAMILIES, MULTI_IMAGE_FAMILIES, family_params

from halluguard import cli
from halluguard.adapters import adapter_for
from halluguard.models import chat_prompt, encode, load_model

# (height, width) of the pictures: square, wide and tall, so AnyRes picks different grids, Idefics3
# and SmolVLM split into different tile counts and Qwen's patch grids differ.
SIZES = [(108, 108), (60, 140), (140, 60), (40, 40)]


@pytest.fixture(scope="session")
def coco(tmp_path_factory):
    return str(build_coco_folder(tmp_path_factory.mktemp("coco")))


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [SIZES[(seed + k) % len(SIZES)] for k in range(count)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """Brute force: the half-open runs of ``image_id`` in ``ids``."""
    runs, start = [], None
    for position, token in enumerate([*ids, None]):
        if token == image_id and start is None:
            start = position
        elif token != image_id and start is not None:
            runs.append((start, position))
            start = None
    return runs


def run(argv: str) -> int:
    return cli.main(shlex.split(argv))


def rows_of(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and not [r for r in rows if "error" in r]
    return sorted(rows, key=lambda r: r["key"])


@pytest.mark.parametrize("family", family_params())
def test_image_spans_are_the_processor_image_tokens(checkpoint, family):
    model, processor, _ = load_model(checkpoint(family))
    per_prompt = 2 if family in MULTI_IMAGE_FAMILIES else 1
    questions = ["What is here?", "Describe the image in detail, please.", "Is there a dog?"]
    messages = [
        [{"role": "user", "content": [{"type": "image"}] * per_prompt + [{"type": "text", "text": q}]}]
        for q in questions
    ]
    prompts = [chat_prompt(processor, m) for m in messages]
    images = [pictures(per_prompt, seed=r) for r in range(len(prompts))]
    inputs = encode(processor, prompts, images)

    ids = inputs["input_ids"]
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the prompts' lengths differ: some row is padded"
    assert (inputs["attention_mask"][:, -1] == 1).all(), "padding is on the left"
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    expected = [image_runs(row.tolist(), image_id) for row in ids]
    assert adapter_for(model, processor).image_spans(ids) == expected
    runs_per_image = {len(runs) / per_prompt for runs in expected}
    if family in ("idefics3", "smolvlm"):  # tiles plus the global image, each a run
        assert max(runs_per_image) > 1
    else:
        assert runs_per_image == {1}
    with torch.no_grad():  # the model takes these inputs: its image features fill exactly these tokens
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", family_params())
def test_eval_pope_and_chair_with_a_method_of_each_kind(checkpoint, coco, family, tmp_path):
    folder = checkpoint(family)
    pope = "eval pope --dataset testbed --num-images 2 --num-questions 4 --splits random --batch-size 2"
    assert run(f"{pope} --max-new-tokens 4 --model {folder} --method pai --out {tmp_path}/pope") == 0
    assert len(rows_of(tmp_path / "pope")) == 4

    chair = (
        f"eval chair --model {folder} --dataset coco --coco-images {coco} --image-ids {coco}/ids.txt "
        "--num-images 4 --batch-size 2 --max-new-tokens 12"
    )
    assert run(f"{chair} --out {tmp_path}/plain") == 0
    assert run(f"{chair} --method vcd --config '{{\"alpha\": 3.0}}' --out {tmp_path}/vcd") == 0
    plain, vcd = rows_of(tmp_path / "plain"), rows_of(tmp_path / "vcd")
    assert len(plain) == len(vcd) == 4
    assert [r["output"] for r in plain] != [r["output"] for r in vcd], "VCD changed no caption"
    results = json.loads((tmp_path / "vcd" / "results.json").read_text())
    assert results["metrics"]["n"] == 4

    testbed_chair = "eval chair --dataset testbed --num-images 2 --batch-size 2 --max-new-tokens 4"
    assert run(f"{testbed_chair} --model {folder} --method opera --out {tmp_path}/opera") == 0
    assert len(rows_of(tmp_path / "opera")) == 2


@pytest.mark.parametrize("family", family_params())
def test_calibrate_lookback_then_guide_with_it(checkpoint, coco, family, tmp_path):
    folder, classifier = checkpoint(family), tmp_path / "lookback.json"
    calibrate = f"calibrate lookback --model {folder} --coco-images {coco} --annotations {coco} --num-images 8"
    assert run(f"{calibrate} --batch-size 4 --max-new-tokens 32 --out {classifier}") == 0
    assert json.loads(classifier.read_text())
    chair = f"eval chair --model {folder} --dataset coco --coco-images {coco} --image-ids {coco}/ids.txt"
    guided = f'--method lookback --config \'{{"classifier": "{classifier}"}}\''
    assert run(f"{chair} --num-images 2 --batch-size 2 --max-new-tokens 6 {guided} --out {tmp_path}/lb") == 0
    assert len(rows_of(tmp_path / "lb")) == 2


@pytest.mark.parametrize("family", family_params())
def test_demo_compares_and_bench_measures(checkpoint, family, tmp_path, capsys):
    folder, picture = checkpoint(family), tmp_path / "picture.png"
    pictures(1, seed=1)[0].save(picture)
    demo = f"demo --model {folder} --image {picture} --prompt '' --compare --json --max-new-tokens 8"
    capsys.readouterr()
    assert run(f"{demo} --method vcd --config '{{\"alpha\": 3.0}}'") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["plain"]["text"] and shown["guarded"]["text"]
    assert shown["methods"] == "vcd"

    table = tmp_path / "bench.json"
    assert (
        run(f"bench --model {folder} --methods pai vcd opera --new-tokens 3 --batch 2 --repeats 1 --json {table}") == 0
    )
    rows = json.loads(table.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["method"] for r in rows} >= {"plain", "pai", "vcd", "opera"}


def test_a_video_processor_that_needs_torchvision_is_left_out_with_a_warning(checkpoint):
    import transformers
    from transformers.utils import is_torchvision_available
    from transformers.video_processing_utils import BaseVideoProcessor

    from halluguard import compat

    assert not is_torchvision_available(), "these tests cover the install without torchvision"
    with pytest.warns(UserWarning, match="torchvision is not installed: Qwen2VLProcessor is loaded without its video"):
        processor = compat.load_processor(checkpoint("qwen2_vl"))
    assert isinstance(processor, transformers.Qwen2VLProcessor) and type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.video_processor) is BaseVideoProcessor
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.chat_template and processor.tokenizer.image_token == "<|image_pad|>"


def test_a_processor_without_a_video_part_loads_as_transformers_loads_it(checkpoint, recwarn):
    import transformers

    from halluguard import compat

    processor = compat.load_processor(checkpoint("llava"))
    assert type(processor) is transformers.LlavaProcessor
    assert not [w for w in recwarn if "torchvision is not installed" in str(w.message)]


def test_a_folder_the_fallback_cannot_load_either_gives_the_first_error(checkpoint, tmp_path):
    import shutil

    import transformers

    from halluguard import compat

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint("qwen2_vl"), folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(Exception) as plain:
        transformers.AutoProcessor.from_pretrained(str(folder))
    with pytest.raises(type(plain.value)) as ours:
        compat.load_processor(str(folder))
    assert str(ours.value) == str(plain.value)


def test_paligemma_gets_its_bare_prompt_after_the_image_tokens_and_bos(checkpoint):
    model, processor, _ = load_model(checkpoint("paligemma"))
    question = [{"type": "image"}, {"type": "text", "text": "a dog"}]
    prompt = chat_prompt(processor, [{"role": "user", "content": question}])
    assert prompt == "<image>a dog"
    ids = encode(processor, [prompt], pictures(1))["input_ids"][0].tolist()
    image = model.config.image_token_id
    first_text = ids.index(processor.tokenizer.bos_token_id)
    assert ids[:first_text] == [image] * first_text and first_text == 16
    assert processor.tokenizer.convert_ids_to_tokens(ids[first_text + 1 :]) == ["a", "dog", "\n"]


def test_every_family_has_a_checkpoint_recipe():
    from checkpoints import _IMAGE_PROCESSORS, _PROCESSORS

    assert set(_IMAGE_PROCESSORS) == set(_PROCESSORS) == set(FAMILIES)
    assert set(VIDEO_PROCESSORS) < set(FAMILIES)
