"""Presets of the official runs: what each method's own evaluation scripts set for LLaVA-1.5.

``halluguard eval chair|pope --preset NAME`` sets the method and its hyperparameters, the system
prompt, the caption prompt or the question suffix, the answer rule and the decoding of that
repository's CHAIR or POPE script; every option given on the command line wins over the preset, and
``results.json`` records the preset, the script it follows and each option that overrode it.

The official scripts build LLaVA-1.5's conversation by hand (``{system} USER: <image>\\n{question}
ASSISTANT:``); here the system prompt goes in as a system turn of the processor's chat template,
which for LLaVA-1.5 gives that same text and for another family its own layout with that system
prompt. What a preset cannot follow is in its ``notes`` (shown in the README's table).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .chair import CHAIR_PROMPT

# LLaVA's two system prompts (its conversation templates ``llava_v1``/``vicuna_v1`` and OPERA's and
# PAI's copy of LLaVA-1.5's template).
CURIOUS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CURIOUS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclasses.dataclass(frozen=True)
class Run:
    """What one official script sets for one task (the eval options of the same names)."""

    script: str  # the script, as a path in the repository
    max_new_tokens: int
    num_beams: int | None = None  # None: the method's own (OPERA's 5) or 1
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    prompt: str | None = None  # CHAIR: the caption prompt
    prompt_suffix: str = ""  # POPE: appended to every question
    answer_rule: str | None = None  # POPE: how answers are read


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    repository: str
    method: str
    config: dict[str, Any]  # the method's fields the scripts set (where they differ from its defaults or matter)
    system_prompt: str
    runs: dict[str, Run]  # task name -> its script's settings
    layout: str = ""  # the exact LLaVA-1.5 conversation, where the scripts differ from LLaVA's own
    notes: str = ""  # where the preset cannot follow the scripts
    refusal: str = ""  # why there is no CHAIR or POPE preset at all


# OPERA's and PAI's LLaVA-1.5 conversation: the system prompt joined to "USER:" without a space and
# the image placeholder followed by a space (``{system}``, ``{image}``, ``{text}``); LLaVA's own
# ``llava_v1`` template (VCD, AvisC) is what LLaVA-1.5's chat template gives with a system turn.
JOINED_LAYOUT = "{system}USER: {image} {text} ASSISTANT:"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="opera",
            repository="shikiw/OPERA",
            method="opera",
            config={"scale_factor": 50.0, "threshold": 15, "num_attn_candidates": 5, "penalty_weights": 1.0},
            system_prompt=CURIOUS_USER,
            layout=JOINED_LAYOUT,
            runs={
                "chair": Run("chair_eval.py", max_new_tokens=512, num_beams=5, prompt=CHAIR_PROMPT),
                "pope": Run("pope_eval.py", max_new_tokens=10, num_beams=5, answer_rule="opera"),
            },
            notes="CHAIR images: the standard 500 (OPERA's first 500 of a seed-42 shuffle of the val2014 "
            "listing); beams ranked as transformers 4.29 ranks them (the method's default)",
        ),
        Preset(
            name="vcd",
            repository="DAMO-NLP-SG/VCD",
            method="vcd",
            config={"alpha": 1.0, "beta": 0.2, "noise_step": 500},
            system_prompt=CURIOUS_HUMAN,
            runs={
                "pope": Run(
                    "experiments/cd_scripts/llava1.5_pope.bash (experiments/eval/object_hallucination_vqa_llava.py)",
                    max_new_tokens=1024,
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    prompt_suffix=" Please answer this question with one word.",
                    answer_rule="vcd",
                )
            },
            notes="beta 0.2 as the script passes it (its argparse default is 0.1); the script seeds with 55, "
            "here rows draw from --seed",
        ),
        Preset(
            name="avisc",
            repository="sangminwoo/AvisC",
            method="avc",
            config={"alpha": 1.0, "beta": 0.1, "layer_gamma": 0.5, "lamb": 1.0, "masking_scheme": "zeros"},
            system_prompt=CURIOUS_HUMAN,
            runs={
                "pope": Run(
                    "eval_bench/scripts/pope_eval_batch.sh (eval_bench/pope_eval_llavab.py)",
                    max_new_tokens=64,
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    answer_rule="vcd",
                )
            },
            notes="lamb 1.0 as the scripts pass it (argparse: 0.99); the POPE script as shipped leaves "
            "use_avisc off and several variables unset, so the method's settings follow its AMBER script "
            "and argparse",
        ),
        Preset(
            name="pai",
            repository="LALBJ/PAI",
            method="pai",
            config={"alpha": 0.2, "use_cfg": True, "gamma": 1.1, "start_layer": 2},
            system_prompt=CURIOUS_USER,
            layout=JOINED_LAYOUT,
            runs={
                "chair": Run(
                    "chair_eval.py", max_new_tokens=512, prompt="Please help me describe the image in detail."
                ),
                "pope": Run("pope_eval.py", max_new_tokens=512),
            },
            notes="gamma 1.1 and the guidance on as the README's commands run it (argparse: gamma 2, guidance "
            "off); CHAIR images: the standard 500 (PAI draws 500 with seed 927 from its own listing)",
        ),
        Preset(
            name="vhr",
            repository="jinghan1he/VHR",
            method="vhr",
            config={"alpha": 2.0, "include_layer1": True, "outlier_filter": True},
            system_prompt="",
            runs={
                "chair": Run("paper, Table 1 setup (the repository could not be read)", 512, prompt=CHAIR_PROMPT),
                "pope": Run("paper, Table 2 setup; 8 new tokens as a harness that imports the code runs it", 8),
            },
            notes="the repository could not be read; settings from the paper (alpha 2, layer 1 and the last 14, "
            "outlier filter, greedy, 512 tokens for CHAIR) and from a harness that runs its main.py",
        ),
        Preset(
            name="decore",
            repository="aryopg/DeCoRe",
            method="decore",
            config={},
            system_prompt="",
            runs={},
            refusal="DeCoRe's repository evaluates text QA and summarisation only (no CHAIR, POPE or image "
            "script); run --method decore with your own settings",
        ),
    )
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


# ---- resolving a preset against the command line ------------------------------------------------------


def resolve(name: str, task: str, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(options, record)`` for ``task`` under preset ``name``: ``options`` maps each option the
    preset sets to its value, where ``given`` (option -> value on the command line, ``None`` when not
    given) does not set it; ``config`` merges field by field. ``record`` is what ``results.json``
    keeps: the preset, its script, what it set and what the command line overrode.

    Raises ``ValueError`` when the preset has no script for ``task``."""
    chosen = preset(name)
    if chosen.refusal:
        raise ValueError(f"--preset {name}: {chosen.refusal}")
    if task not in chosen.runs:
        covered = " and ".join(t.upper() for t in chosen.runs)
        raise ValueError(f"--preset {name}: {chosen.repository} has {covered} scripts only, no {task.upper()} one")
    run = chosen.runs[task]
    wanted = {
        "method": chosen.method,
        "system_prompt": chosen.system_prompt or None,
        "max_new_tokens": run.max_new_tokens,
        "num_beams": run.num_beams,
        "do_sample": run.do_sample,
        "temperature": run.temperature,
        "top_p": run.top_p,
        **({"prompt": run.prompt} if task == "chair" else {}),
        **({"prompt_suffix": run.prompt_suffix, "answer_rule": run.answer_rule} if task == "pope" else {}),
    }
    wanted = {k: v for k, v in wanted.items() if v is not None}
    layout = {"layout": chosen.layout} if chosen.layout else {}
    options, overridden = dict(layout), {}
    for option, value in wanted.items():
        if given.get(option) is None:
            options[option] = value
        elif given[option] != value:
            overridden[option] = {"preset": value, "given": given[option]}
    method = options.get("method", given.get("method"))
    if method == chosen.method and chosen.config:
        mine = dict((given.get("config") or {}).get(method, {}))
        options["config"] = {method: chosen.config | mine}
        overridden |= {
            f"config.{field}": {"preset": value, "given": mine[field]}
            for field, value in chosen.config.items()
            if field in mine and mine[field] != value
        }
    record = {
        "name": name,
        "repository": chosen.repository,
        "script": run.script,
        "layout": chosen.layout,
        "set": wanted | ({"config": {chosen.method: chosen.config}} if chosen.config else {}),
        "overridden": overridden,
    }
    return options, record
