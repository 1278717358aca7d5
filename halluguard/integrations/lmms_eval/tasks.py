"""Local lmms-eval tasks on the shipped test model's world: POPE questions that run offline.

:func:`write_testbed_pope` writes, per POPE split, a parquet file (question id, question, answer,
image) and a task YAML named ``halluguard_testbed_pope_<split>`` (names of lmms-eval's own tasks win
on a clash, so these are unique). The questions are those of ``halluguard eval pope --dataset
testbed`` with the same ``--num-images``, ``--seed`` and ``--num-questions``, asked with the same
prompt and greedy decoding (10 new tokens), so the two routes can be compared answer by answer.
Scoring is lmms-eval's own POPE scoring: the answer, lower-cased and stripped, must be exactly
"yes" or "no" (``halluguard eval pope``'s default rule reads the answer's first sentence instead).

Run one with ``lmms-eval --include_path FOLDER --tasks halluguard_testbed_pope_random ...`` or
``simple_evaluate(..., task_manager=TaskManager(include_path=FOLDER))``.
"""

from __future__ import annotations

from pathlib import Path

from ...eval import pope as pope_lib

TASK_PREFIX = "halluguard_testbed_pope_"
_HERE = "halluguard.integrations.lmms_eval.tasks"
_POPE = "lmms_eval.tasks.pope.utils"
METRICS = ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
MAX_NEW_TOKENS = 10  # as halluguard eval pope


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def _task_yaml(name: str, data_file: str, prompt_suffix: str) -> str:
    metrics = "\n".join(
        f"  - metric: pope_{m}\n    aggregation: !function {_POPE}.pope_aggregate_{m}\n    higher_is_better: true"
        for m in METRICS
    )
    suffix = prompt_suffix.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f"""task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_visual: !function {_HERE}.doc_to_visual
doc_to_text: !function {_HERE}.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function {_POPE}.pope_process_results
metric_list:
{metrics}
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{suffix}"
metadata:
  - version: 0.0
"""


def write_testbed_pope(
    folder: str | Path,
    splits: tuple[str, ...] = pope_lib.SPLITS,
    num_images: int = 500,
    seed: int = 0,
    num_questions: int | None = None,
    prompt_suffix: str = "",
) -> list[str]:
    """Write the parquet files and task YAMLs of ``splits`` into ``folder``; returns the task names."""
    import datasets

    from ...testbed.evaluate import pope_question_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image_name": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    names = []
    for split in splits:
        if split not in pope_lib.SPLITS:
            raise ValueError(f"unknown POPE split {split!r}; choose from {', '.join(pope_lib.SPLITS)}")
        questions, loaders = pope_question_file(split, num_images, seed)
        questions = questions[:num_questions]
        images = {name: loaders[name]() for name in {q["image"] for q in questions}}
        table = datasets.Dataset.from_dict(
            {
                "question_id": [q["question_id"] for q in questions],
                "question": [q["text"] for q in questions],
                "answer": [q["label"] for q in questions],
                "image_name": [q["image"] for q in questions],
                "image": [images[q["image"]] for q in questions],
            },
            features=features,
        )
        data_file = f"pope_{split}.parquet"
        table.to_parquet(str(folder / data_file))
        name = TASK_PREFIX + split
        (folder / f"{name}.yaml").write_text(_task_yaml(name, data_file, prompt_suffix))
        names.append(name)
    return names
