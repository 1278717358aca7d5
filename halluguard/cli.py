"""The ``halluguard`` console script.

Every user mistake is answered with one line on stderr and a non-zero exit (2 for a wrong command
line, 1 for a run that failed); ``--debug`` shows the traceback instead. torch and transformers are
imported only by the commands that need them, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path

from ._version import __version__
from .eval.chair import CHAIR_PROMPT
from .eval.pope import RULES as ANSWER_RULES
from .eval.pope import SPLITS as POPE_SPLITS
from .eval.presets import PRESETS
from .eval.runner import CHAIR_DATASETS, POPE_DATASETS
from .eval.runner import TESTBED_CHAIR_SPLITS as TESTBED_SPLITS
from .interrupts import Interrupts
from .models import DTYPES, ModelError, looks_like_path


class UsageError(Exception):
    """A command line that cannot run as given (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or unset:
            return text
        return f"{text} (default: %(default)s)"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# ---- methods and models -------------------------------------------------------------------------------


def _command_exists(words: list[str]) -> bool:
    """Whether ``halluguard <words...>`` names a command of this parser."""
    parser: argparse.ArgumentParser = build_parser()
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return True
        if word not in actions[0].choices:
            return False
        parser = actions[0].choices[word]
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


_COMMAND = re.compile(r"`halluguard ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)*)[^`]*`")


def mark_missing_commands(text: str) -> str:
    """``halluguard ...`` commands quoted in ``text`` that this version lacks get "(not shipped yet)"."""

    def mark(match: re.Match) -> str:
        words = match.group(1).split()
        for n in range(len(words), 0, -1):
            if _command_exists(words[:n]):
                return match.group(0)
        return f"{match.group(0)} (not shipped yet)"

    return _COMMAND.sub(mark, text)


def _cmd_methods(args: argparse.Namespace) -> int:
    from .registry import entry, list_methods

    names = [args.name] if args.name else list_methods()
    for name in names:
        item = entry(name)
        status = "available" if item.available else "config only (implementation not shipped yet)"
        print(f"{name:10s} {item.summary}  [{status}]")
        if args.name or args.verbose:
            for field, default, doc in item.config_cls.describe():
                print(f"    {field:22s} = {default!r:12s} {mark_missing_commands(doc)}")
            print(f"    neutral: {item.config_cls.neutral_overrides}")
            for line in item.capabilities_for().describe():
                print(f"    {mark_missing_commands(line)}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main

    return main(effects=not args.skip_effects)


def _cmd_models(args: argparse.Namespace) -> int:
    from .adapters import ADAPTERS

    for model_type, adapter in sorted(ADAPTERS.items()):
        print(f"{model_type:16s} {adapter.family}")
    return 0


def method_configs(spec: str, overrides: str | None) -> list:
    """Configs for ``spec`` ("a+b") with JSON overrides: ``{"field": v}`` for one method, or
    ``{"name": {"field": v}}`` per method; ``overrides`` may also be a JSON file."""
    from .registry import configs_from_spec

    try:
        return configs_from_spec(spec, overrides, method_option="--method", config_option="--config")
    except ValueError as err:
        raise UsageError(str(err)) from None


# ---- eval --------------------------------------------------------------------------------------------


def _given(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name, None) is not None


PRESET_OPTIONS = (
    "method",
    "system_prompt",
    "max_new_tokens",
    "num_beams",
    "do_sample",
    "temperature",
    "top_p",
    "prompt",
    "prompt_suffix",
    "answer_rule",
)
PRESET_NAMES = tuple(PRESETS)
PLAIN_DEFAULTS = {"method": "", "system_prompt": "", "do_sample": False, "prompt_suffix": "", "answer_rule": "pope"}


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options ``--preset`` sets and the command line leaves unset (``args.preset_record``:
    what ``results.json`` records), then the plain defaults of whatever is still unset."""
    args.preset_record, args.llava_layout = None, ""
    if args.preset:
        from .eval.presets import resolve
        from .registry import overrides_by_method

        given = {name: getattr(args, name, None) for name in PRESET_OPTIONS}
        try:
            spec = args.method if args.method is not None else resolve(args.preset, args.task, {})[0]["method"]
            if args.config is not None:
                given["config"] = overrides_by_method(spec, args.config, method_option="--method")
            options, args.preset_record = resolve(args.preset, args.task, given)
        except ValueError as err:
            raise UsageError(str(err)) from None
        args.llava_layout = options.pop("layout", "")
        _fit_the_test_model(args, options)
        if given["do_sample"] is False:  # the preset's sampling settings go with its sampling
            options = {k: v for k, v in options.items() if k not in ("temperature", "top_p")}
        for name, value in options.items():
            setattr(args, name, value)
    for name, value in PLAIN_DEFAULTS.items():
        if getattr(args, name, None) is None and hasattr(args, name):
            setattr(args, name, value)
    if args.task == "chair" and args.prompt is None:
        args.prompt = CHAIR_PROMPT


def _fit_the_test_model(args: argparse.Namespace, options: dict) -> None:
    """On the shipped test model (256 positions), a preset's token limit above the task's own (64 for
    CHAIR, 10 for POPE) becomes that, recorded in the preset's record."""
    limit = {"chair": 64, "pope": 10}[args.task]
    if args.model == "testbed" and options.get("max_new_tokens", 0) > limit:
        args.preset_record["adjusted"] = {
            "max_new_tokens": {"preset": options["max_new_tokens"], "used": limit, "why": "the test model's context"}
        }
        options["max_new_tokens"] = limit


def check_eval_args(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other options and refuse options that do not apply."""
    if args.model != "testbed" and looks_like_path(args.model) and not Path(args.model).expanduser().exists():
        raise UsageError(f"model path {args.model} does not exist")
    testbed_data = args.dataset == "testbed" if args.dataset else args.model == "testbed"
    args.dataset = args.dataset or ("testbed" if testbed_data else "coco")
    if testbed_data:
        for option in ("coco_images", "image_ids"):
            if _given(args, option):
                raise UsageError(f"--{option.replace('_', '-')} does not apply to the testbed dataset")
    else:
        if not args.coco_images:
            raise UsageError(f"the {args.dataset} dataset needs --coco-images DIR (the COCO val2014 images)")
        if not Path(args.coco_images).is_dir():
            raise UsageError(f"--coco-images {args.coco_images}: no such folder")
        if args.task == "chair" and _given(args, "split"):
            raise UsageError("--split applies to the testbed dataset only (COCO CHAIR uses val2014 images)")
        if args.task == "pope" and _given(args, "num_images"):
            raise UsageError(
                f"--num-images applies to the testbed dataset only ({args.dataset} questions come with their "
                "images; --num-questions takes the first N per split)"
            )
    if not args.do_sample:
        for option in ("temperature", "top_p"):
            if _given(args, option):
                raise UsageError(f"--{option.replace('_', '-')} applies only with --do-sample")
    if args.config is not None and not args.method:
        raise UsageError("--config needs --method (the method whose fields it sets)")
    if args.chart and not args.controls:
        raise UsageError("--chart applies with --controls (for other runs: halluguard eval report DIR ... --chart)")
    if args.chart:
        from .outputs import picture_file

        try:
            picture_file(args.chart, "--chart")
        except ValueError as err:
            raise UsageError(str(err)) from None


def control_configs(methods: list) -> list:
    """``methods`` with the one that has a control row switched to it; a :class:`UsageError` when none
    (or more than one) has one."""
    import dataclasses

    able = [i for i, cfg in enumerate(methods) if hasattr(cfg, "control") and getattr(cfg, "guided", True)]
    if len(able) != 1:
        raise UsageError(
            "--controls needs exactly one method with a control row: vcd, avc, decore, or pai with its guidance"
        )
    return [dataclasses.replace(cfg, control=True) if i == able[0] else cfg for i, cfg in enumerate(methods)]


def _chair_task(args: argparse.Namespace):
    from .eval.runner import ChairTask

    return ChairTask(
        dataset=args.dataset,
        num_images=args.num_images,
        split=args.split or "misleading",
        image_ids=args.image_ids or "opera",
        coco_images=args.coco_images,
        prompt=args.prompt,
        short=args.short,
    )


def _pope_task(args: argparse.Namespace):
    from .eval.runner import PopeTask

    return PopeTask(
        dataset=args.dataset,
        splits=tuple(args.splits),
        num_images=args.num_images or 500,
        num_questions=args.num_questions,
        coco_images=args.coco_images,
        answer_rule=args.answer_rule,
        prompt_suffix=args.prompt_suffix,
    )


TASKS = {"chair": _chair_task, "pope": _pope_task}  # eval's task commands -> the task their options describe


def _report_failed(results: dict) -> int:
    failed = results["failed"]
    if not failed["count"]:
        return 0
    reasons = "; ".join(f"{f['key']}: {f['error']}" for f in failed["first"][:3])
    print(
        f"halluguard: {failed['count']} of {results['samples']} rows failed ({reasons}); the scores cover the "
        "others; rerun the same command to retry them",
        file=sys.stderr,
    )
    return 1


def _eval_settings(args: argparse.Namespace, methods: list):
    """``(task, run settings)`` from eval's options; a mistake, or a method and decoding that cannot run
    together, is a :class:`UsageError` (before the model loads)."""
    from .api import check_decoding
    from .eval.runner import Decoding, RunSettings
    from .registry import method_beams

    try:
        task = TASKS[args.task](args)
        decoding = Decoding(
            max_new_tokens=args.max_new_tokens or task.default_max_new_tokens,
            num_beams=args.num_beams or method_beams(methods),
            do_sample=args.do_sample,
            temperature=args.temperature or 1.0,
            top_p=args.top_p or 1.0,
        )
        settings = RunSettings(
            decoding,
            batch_size=args.batch_size,
            seed=args.seed,
            system_prompt=args.system_prompt,
            llava_layout=args.llava_layout,
            preset=args.preset_record,
        )
        check_decoding(methods, decoding.num_beams, decoding.do_sample)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return task, settings


def _guarded_runs(args: argparse.Namespace, runs: list, run) -> list[dict] | None:
    """``run(model, processor, guard, info, folder)`` per ``(folder, methods)`` of ``runs``, on the model
    eval names (loaded once), wrapped with those methods (if any) and unwrapped after each."""
    from .api import wrap
    from .eval.runner import model_info
    from .models import load_model

    model, processor, name = load_model(args.model, dtype=args.dtype, device=args.device)
    info = model_info(model, name)
    results = []
    for folder, methods in runs:
        guard = wrap(model, processor, methods) if methods else None
        try:
            results.append(run(model, processor, guard, info, folder))
        finally:
            if guard is not None:
                guard.unwrap()
    return None if any(r is None for r in results) else results


def _cmd_eval(args: argparse.Namespace) -> int:
    apply_preset(args)
    check_eval_args(args)
    methods = method_configs(args.method, args.config)
    from .eval import runner

    task, settings = _eval_settings(args, methods)
    label = args.method + (f"-preset_{args.preset}" if args.preset else "")
    out = Path(args.out) if args.out else runner.default_out_dir(task, args.model, label, settings.decoding)
    runs = [(out, methods)]
    if args.controls:
        plain_label = f"preset_{args.preset}" if args.preset else ""
        plain = Path(f"{out}-plain") if args.out else None
        plain = plain or runner.default_out_dir(task, args.model, plain_label, settings.decoding)
        runs = [(plain, []), (out, methods), (Path(f"{out}-control"), control_configs(methods))]
    prepared = runner.task_samples(task, settings.seed)  # data mistakes show before the model loads
    shard = runner.launcher_shard()

    def run(model, processor, guard, info, folder):
        return runner.evaluate(
            task, model, processor, folder, guard, settings, info, shard, overwrite=args.overwrite, prepared=prepared,
            checkpoint=getattr(args, "checkpoint", None),
        )  # fmt: skip

    results = _guarded_runs(args, runs, run)
    if results is None:  # not process 0: it prints
        return 0
    from .eval.report import TABLES, save_chart

    print(TABLES[task.name](results))
    for folder, _ in runs:
        print(f"results: {folder / 'results.json'}")
    if args.chart:
        save_chart(results, task.name, args.chart)
        print(f"chart: {args.chart}")
    return max(_report_failed(r) for r in results)


def _cmd_report(args: argparse.Namespace) -> int:
    from .eval.report import report
    from .outputs import picture_file

    if args.chart:
        try:
            picture_file(args.chart, "--chart")
        except ValueError as err:
            raise UsageError(str(err)) from None
    print(report(args.runs, chart=args.chart))
    if args.chart:
        print(f"chart: {args.chart}")
    return 0


def _leaf(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _add_eval_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="CHAIR and POPE evaluation", formatter_class=HelpFormatter)
    tasks = ev.add_subparsers(dest="task", required=True, metavar="{chair,pope,report}")
    _add_chair_parser(tasks)
    _add_pope_parser(tasks)
    rep = _leaf(tasks, "report", help="compare runs: markdown table and bar chart")
    rep.add_argument("runs", nargs="+", help="run folders (or results.json files)")
    rep.add_argument("--chart", metavar="PNG", help="save a bar chart here")
    rep.set_defaults(func=_cmd_report)


def _add_chair_parser(tasks) -> None:
    p = _leaf(tasks, "chair", help="run CHAIR with a method composition (or none)")
    _add_model_and_data_options(p, CHAIR_DATASETS, other_datasets="")
    _add_run_options(p, max_tokens="512 on COCO, 64 with --short or on the testbed")
    p.add_argument("--num-images", type=_count, default=500, help="images to caption")
    _add_weights_options(p)
    p.add_argument("--short", action="store_true", help="64-token regime: drop a last unfinished sentence")
    p.add_argument(
        "--image-ids",
        help="COCO: 'opera' (the standard 500), 'seeded' (a seeded sample), or a file of ids (default: opera)",
    )
    p.add_argument("--prompt", help=f"caption prompt (default: {CHAIR_PROMPT})")
    p.add_argument("--split", choices=TESTBED_SPLITS, help="testbed split (default: misleading)")


def _add_pope_parser(tasks) -> None:
    p = _leaf(tasks, "pope", help="run POPE with a method composition (or none)")
    _add_model_and_data_options(p, POPE_DATASETS, other_datasets="; also aokvqa, gqa")
    _add_run_options(p, max_tokens="10")
    p.add_argument("--num-images", type=_count, help="testbed scenes, 6 questions each (default: 500)")
    _add_weights_options(p)
    p.add_argument("--splits", nargs="+", choices=POPE_SPLITS, default=list(POPE_SPLITS), help="POPE splits")
    p.add_argument("--num-questions", type=_count, help="first N questions per split (default: all)")
    p.add_argument("--answer-rule", choices=ANSWER_RULES, help="yes/no parsing rule (default: pope)")
    p.add_argument("--prompt-suffix", help="text appended to each question (default: none)")


def _add_model_and_data_options(p: argparse.ArgumentParser, datasets: tuple[str, ...], other_datasets: str) -> None:
    """An eval task's model, methods and data options."""
    p.add_argument(
        "--model",
        default="testbed",
        help="hub id or local path of a supported LVLM, or 'testbed' (the shipped test model)",
    )
    p.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="the settings of a method's official CHAIR or POPE script (method, hyperparameters, system prompt, "
        "prompt, decoding); options given beside it win, and results.json records both (README: Presets)",
    )
    p.add_argument(
        "--method", help="method spec, e.g. 'pai' or 'pai+var' (default: none, vanilla; '' with --preset: none)"
    )
    p.add_argument("--config", help="JSON (or a JSON file) of config overrides, e.g. '{\"alpha\": 0.5}'")
    p.add_argument(
        "--dataset",
        choices=datasets,
        help="coco (needs --coco-images) or testbed (the synthetic world)"
        + other_datasets
        + " (default: testbed for the test model, else coco)",
    )
    p.add_argument("--coco-images", metavar="DIR", help="folder of COCO val2014 images (COCO data only)")


def _add_run_options(p: argparse.ArgumentParser, max_tokens: str) -> None:
    """An eval task's run folder, batching and decoding options (``max_tokens``: the default token limit)."""
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run folder; a rerun with the same settings resumes it (default: runs/<task>-<data>-<model>-<method>, "
        "plus -beams5, -sampled, ... when the decoding is not greedy)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run folder made with other settings")
    p.add_argument("--batch-size", type=_count, default=8, help="samples per generate call")
    p.add_argument("--max-new-tokens", type=_count, help=f"token limit per answer (default: {max_tokens})")
    p.add_argument("--num-beams", type=_count, help="beam count (default: 1, or the method's own, e.g. OPERA's 5)")
    p.add_argument(
        "--do-sample",
        action=argparse.BooleanOptionalAction,
        help="sample (one row at a time, seeded by row); --no-do-sample: greedy or beam search under a sampling preset",
    )
    p.add_argument("--system-prompt", help="a system turn before each prompt (default: none)")
    p.add_argument("--temperature", type=_positive_float, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-p", type=_probability, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="run seed (rows derive theirs from it and their id)")
    p.add_argument(
        "--controls",
        action="store_true",
        help="also run plain decoding and the method's control row (everything but the contrast) on the same "
        "rows, side by side: <out>-plain, <out>-control (vcd, avc, decore, pai with guidance)",
    )
    p.add_argument("--chart", metavar="PNG", help="with --controls: save a bar chart of the three runs")


def _add_weights_options(p: argparse.ArgumentParser) -> None:
    """An eval task's dtype and device options; the task runs through :func:`_cmd_eval`."""
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: the checkpoint's; fp32 for testbed)"
    )
    p.add_argument("--device", help="e.g. cpu or cuda:0 (default: the GPU under a launcher, else CPU)")
    p.set_defaults(func=_cmd_eval)


def _cmd_calibrate_sink_dims(args: argparse.Namespace) -> int:
    from .calibrate.sink_dims import main as sink_dims

    try:
        return sink_dims(args.model, args.out, args.tau, args.top)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


SYNTHETIC_HEADS_OPTIONS = ("trials", "haystack_length", "needle_length", "seed", "min_copy_accuracy")
OFFICIAL_HEADS_OPTIONS = (
    "needles",
    "haystack",
    "min_length",
    "max_length",
    "lengths",
    "depths",
    "max_new_tokens",
    "min_recall",
    "no_chat_template",
)


def _cmd_calibrate_retrieval_heads(args: argparse.Namespace) -> int:
    from .outputs import output_file

    foreign = SYNTHETIC_HEADS_OPTIONS if args.protocol == "official" else OFFICIAL_HEADS_OPTIONS
    given = [
        f"--{name.replace('_', '-')}"
        for name in foreign
        if getattr(args, name) is not None and getattr(args, name) is not False
    ]
    if given:
        raise UsageError(f"{', '.join(given)}: not an option of --protocol {args.protocol}")
    try:
        output_file(args.out)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.protocol == "official":
        from .calibrate.needle_haystack import DEPTHS, LENGTHS, MAX_NEW_TOKENS, MIN_RECALL, main

        return main(
            args.model,
            args.out,
            needles_file=args.needles,
            haystack=args.haystack,
            min_length=args.min_length,
            max_length=args.max_length,
            lengths=args.lengths or LENGTHS,
            depths=args.depths or DEPTHS,
            max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS,
            min_recall=MIN_RECALL if args.min_recall is None else args.min_recall,
            chat_template=not args.no_chat_template,
        )
    from .calibrate.retrieval_heads import main

    return main(
        args.model,
        args.out,
        trials=args.trials or 20,
        haystack_length=args.haystack_length,
        needle_length=args.needle_length or 16,
        seed=args.seed or 0,
        min_copy_accuracy=0.5 if args.min_copy_accuracy is None else args.min_copy_accuracy,
    )


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"must be in [0, 100), got {text}")
    return value


def _cmd_calibrate_lookback(args: argparse.Namespace) -> int:
    from .calibrate.lookback import main

    try:
        return main(
            args.model,
            args.out,
            num_images=args.num_images,
            coco_images=args.coco_images,
            annotations=args.annotations,
            context=args.context,
            level=args.level,
            window=args.window,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def _cmd_calibrate_vti(args: argparse.Namespace) -> int:
    from .calibrate.vti import main

    if (args.demos is None) != (args.images is None):
        raise UsageError("--demos and --images go together: the demonstrations and the folder of their images")
    try:
        return main(
            args.model,
            args.out,
            demos=args.demos,
            images=args.images,
            num_demos=args.num_demos,
            mask_ratio=args.mask_ratio,
            trials=args.trials,
            seed=args.seed,
            text_only=args.text_only,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def _add_vti_parser(tools) -> None:
    vti = _leaf(tools, "vti", help="VTI's steering directions for a model, from demonstrations (safetensors out)")
    vti.add_argument("--model", required=True, help="hub id or local path, or 'testbed' (its world's scenes)")
    vti.add_argument("--out", required=True, help="write the directions here (.safetensors)")
    vti.add_argument(
        "--demos",
        metavar="JSONL",
        help="demonstrations in the official format (image, question, value, h_value per line); needed for a "
        "model other than the test model",
    )
    vti.add_argument("--images", metavar="DIR", help="the folder of the demonstrations' images")
    vti.add_argument("--num-demos", type=_count, default=70, help="demonstrations to use (the README's run: 70)")
    vti.add_argument("--mask-ratio", type=_fraction, default=0.99, help="share of patches masked (default 0.99)")
    vti.add_argument("--trials", type=_count, default=50, help="masked copies per image, averaged (default 50)")
    vti.add_argument("--seed", type=int, default=0, help="seed of the masks (and of the test world's demonstrations)")
    vti.add_argument("--text-only", action="store_true", help="compute the text directions only")
    vti.set_defaults(func=_cmd_calibrate_vti)


def _add_retrieval_heads_parser(tools) -> None:
    heads = _leaf(
        tools,
        "retrieval-heads",
        help="retrieval heads of the text backbone (for DeCoRe), in the official Retrieval_Head JSON format",
    )
    heads.add_argument("--model", required=True, help="hub id or local path, or 'testbed'")
    heads.add_argument("--out", required=True, help="write the JSON here ({'layer-head': [score per trial]})")
    heads.add_argument(
        "--protocol",
        choices=("synthetic", "official"),
        default="synthetic",
        help="synthetic: teacher-forced copying of random-token needles (any tokenizer, fast); official: "
        "Retrieval_Head's natural-language needles in book text, answered greedily, kept when ROUGE-1 "
        "recall > 50 (for real checkpoints; the README says when each fits)",
    )
    synthetic = heads.add_argument_group("--protocol synthetic")
    synthetic.add_argument("--trials", type=_count, help="needle-in-a-haystack trials (default 20)")
    synthetic.add_argument(
        "--haystack-length",
        type=_count,
        help="random haystack tokens per trial (default: 1000, or less to fit the model's context)",
    )
    synthetic.add_argument("--needle-length", type=_count, help="needle tokens to copy (default 16)")
    synthetic.add_argument("--seed", type=int, help="seed of the haystacks, needles and depths (default 0)")
    synthetic.add_argument(
        "--min-copy-accuracy",
        type=_fraction,
        help="record a trial only if the model copies more than this share of the needle (default 0.5); "
        "0 records every trial",
    )
    official = heads.add_argument_group("--protocol official")
    official.add_argument(
        "--needles",
        metavar="JSONL",
        help="needles, one JSON object per line: needle, question, answer (or real_needle), haystack "
        "(a file beside it); default: the official three, each in its shipped haystack",
    )
    official.add_argument("--haystack", metavar="PATH", help="a text file, or a folder of .txt files, for every needle")
    official.add_argument("--min-length", type=_count, help="shortest context in tokens (default 1000)")
    official.add_argument(
        "--max-length", type=_count, help="longest context in tokens (default: 50000 or the model's context)"
    )
    official.add_argument("--lengths", type=_count, help="context lengths, evenly spaced (default 20)")
    official.add_argument("--depths", type=_count, help="needle depths from 0 to 100 percent (default 10)")
    official.add_argument("--max-new-tokens", type=_count, help="longest answer (default 50)")
    official.add_argument(
        "--min-recall",
        type=_percent,
        help="record a trial only if the answer's ROUGE-1 recall (percent) is above this (default 50); "
        "0 records every trial",
    )
    official.add_argument(
        "--no-chat-template",
        action="store_true",
        help="plain text prompt even when the processor has a chat template",
    )
    heads.set_defaults(func=_cmd_calibrate_retrieval_heads)


def _add_calibrate_parsers(sub) -> None:
    cal = sub.add_parser("calibrate", help="offline calibration for methods that need model-specific data")
    tools = cal.add_subparsers(dest="tool", required=True)
    dims = _leaf(tools, "sink-dims", help="massive-activation dimensions of the text backbone (for VAR)")
    dims.add_argument("--model", required=True, help="hub id or local path, or 'testbed'")
    dims.add_argument("--out", help="save the result as JSON here")
    dims.add_argument("--tau", type=_positive_float, default=20.0, help="score threshold (VAR's tau)")
    dims.add_argument("--top", type=_count, default=2, help="how many dimensions to keep at most")
    dims.set_defaults(func=_cmd_calibrate_sink_dims)
    _add_retrieval_heads_parser(tools)
    look = _leaf(
        tools,
        "lookback",
        help="train Lookback Lens' classifier on the model's own captions, labelled by CHAIR (JSON out)",
    )
    look.add_argument("--model", required=True, help="hub id or local path, or 'testbed' (its world's scenes)")
    look.add_argument("--out", required=True, help="write the classifier here (JSON)")
    look.add_argument("--num-images", type=_count, default=500, help="images to caption")
    look.add_argument("--coco-images", metavar="DIR", help="COCO images (a model other than the test model)")
    look.add_argument("--annotations", metavar="DIR", help="COCO instances_*.json for the ground truth")
    look.add_argument("--context", default="prompt", choices=("prompt", "image", "text"), help="context keys")
    look.add_argument("--level", default="window", choices=("window", "mention"), help="training examples")
    look.add_argument("--window", type=_count, default=8, help="tokens per window example")
    look.add_argument("--max-new-tokens", type=_count, default=64, help="caption length limit")
    look.add_argument("--batch-size", type=_count, default=8, help="captions per generate call")
    look.add_argument("--seed", type=int, default=0, help="scene seed (test model)")
    look.set_defaults(func=_cmd_calibrate_lookback)
    _add_vti_parser(tools)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="halluguard",
        description="Decoding-time hallucination mitigation for HuggingFace vision-language models.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"halluguard {__version__}")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = _leaf(sub, "methods", help="list the methods and their configuration fields")
    methods.add_argument("name", nargs="?", help="show one method's fields")
    methods.add_argument("-v", "--verbose", action="store_true", help="show every method's fields")
    methods.set_defaults(func=_cmd_methods)
    models = _leaf(sub, "models", help="list the supported model types (config.model_type)")
    models.set_defaults(func=_cmd_models)
    doctor = _leaf(
        sub, "doctor", help="check the guard's identities and the methods' effects with the installed transformers"
    )
    doctor.add_argument(
        "--skip-effects", action="store_true", help="only the identities (seconds): not the README's method effects"
    )
    doctor.set_defaults(func=_cmd_doctor)
    _add_eval_parsers(sub)
    _add_calibrate_parsers(sub)
    _add_demo_parser(sub)
    _add_bench_parser(sub)
    return parser


def _bench_overrides(text: str | None, specs: list[str]) -> dict[str, dict]:
    """``--config``: JSON (or a JSON file) of fields per benched method, each checked."""
    from .registry import configs_from_spec

    if text is None:
        return {}
    path = Path(text)
    try:
        data = json.loads(path.read_text() if len(text) < 4096 and path.is_file() else text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--config is not valid JSON ({err}) and names no file") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError('--config maps each method to its fields, e.g. \'{"pai": {"alpha": 0.5}}\'')
    benched = {name for spec in specs for name in spec.split("+")}
    stray = sorted(set(data) - benched)
    if stray:
        raise UsageError(f"--config sets {', '.join(stray)}, which --methods does not bench")
    for name, fields in data.items():
        try:
            configs_from_spec(name, fields)
        except ValueError as err:
            raise UsageError(f"--config {name}: {err}") from None
    return data


def _bench_defaults(model: str, specs: list[str], given: dict[str, dict], scratch: str) -> dict[str, dict]:
    """Fields the benched methods get unless ``--config`` (``given``) sets them: on a synthetic model,
    stand-ins for calibration data (written under ``scratch`` where a file is needed); on the test
    model, its retrieval heads."""
    from .bench import synthetic

    if model in synthetic.SHAPES:
        return synthetic.stand_ins(model, {name for spec in specs for name in spec.split("+")}, scratch, given)
    if model == "testbed":
        from .testbed import path

        return {"decore": {"retrieval_heads": str(path() / "retrieval_heads.json"), "num_retrieval_heads": 4}}
    return {}


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench
    from .outputs import output_file, picture_file
    from .registry import list_methods

    specs = list_methods() if args.methods == ["all"] else args.methods
    specs = ["+".join(name for name in spec.split("+") if name.strip()) for spec in specs]  # "vhr+" is "vhr"
    for spec in specs:
        method_configs(spec, None)  # unknown names fail before the model loads
    overrides = _bench_overrides(args.config, specs)
    try:
        json_out = output_file(args.json, "--json") if args.json else None
        chart_out = picture_file(args.chart, "--chart") if args.chart else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="halluguard-bench-") as scratch:
        defaults = _bench_defaults(args.model, specs, overrides, scratch)
        overrides = {name: {**defaults.get(name, {}), **overrides.get(name, {})} for name in {*defaults, *overrides}}
        model, processor, inputs, name = bench.load(args.model, args.batch, args.device, args.dtype)
        title = (
            f"{name}, batch {args.batch}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
            f"{model.device}, median of {args.repeats}"
        )
        print(title, flush=True)
        try:
            rows = bench.measure(
                model, processor, inputs, specs, args.new_tokens, args.repeats, overrides, official=args.official,
                checkpoint=getattr(args, "checkpoint", None), ops=args.ops,
            )  # fmt: skip
        except bench.BenchError as err:
            print(f"halluguard bench: {err}", file=sys.stderr)
            return 1
    print(bench.markdown(rows))
    if args.ops:
        print()
        print(bench.ops_markdown(rows))
    if json_out:
        json_out.write_text(json.dumps({"setting": title, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    if chart_out:
        bench.chart(rows, str(chart_out), title)
    return 0


def _add_bench_parser(sub) -> None:
    bench = _leaf(sub, "bench", help="time each method against plain generate, side by side")
    bench.add_argument(
        "--model",
        default="testbed",
        help="testbed, synthetic-medium, synthetic-7b (random weights in LLaVA-1.5-7B's shapes, bf16), "
        "a hub id or a local path",
    )
    bench.add_argument("--methods", nargs="+", default=["all"], help="all, or specs such as vhr pai+vhr")
    bench.add_argument("--config", default=None, help="JSON of method fields per method, e.g. '{\"pai\": {...}}'")
    bench.add_argument("--new-tokens", type=_count, default=32)
    bench.add_argument("--batch", type=_count, default=1)
    bench.add_argument("--repeats", type=_count, default=5)
    bench.add_argument("--threads", type=_count, default=None, help="torch threads (default: torch's choice)")
    bench.add_argument("--device", default=None)
    bench.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    bench.add_argument("--json", default=None, metavar="FILE", help="write the rows here")
    bench.add_argument("--chart", default=None, metavar="FILE.png", help="bar chart of the ratios")
    bench.add_argument(
        "--official",
        action="store_true",
        help="add the official implementations' way for the attention-reading methods: eager attention "
        "returning the maps at every step, a contrast branch as a second sequential forward, OPERA's 5 beams",
    )
    bench.add_argument(
        "--ops",
        action="store_true",
        help="also count, in the same run, the aten operations of the prompt phase and per decoded token, the extra "
        "per layer per step over plain generate, and the Triton kernel launches per token (counts do not vary)",
    )
    bench.set_defaults(func=_cmd_bench)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import app

    args.configs = method_configs(args.method, args.config) if args.config is not None else None
    return app.main(args)


def _add_demo_parser(sub) -> None:
    demo = _leaf(
        sub,
        "demo",
        help="interactive terminal demo: plain and guarded answers side by side",
        description="Interactive: type questions and :commands (:help); lines piped in are answered one by one, "
        "as if typed. With --prompt (or --json) it answers once, prints and exits.",
    )
    demo.add_argument("--model", default="testbed", help="testbed (the shipped test model), a hub id or a local path")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    demo.add_argument("--dtype", default=None, choices=DTYPES, help="weights dtype (default: the checkpoint's)")
    demo.add_argument("--image", default=None, help="an image file (default with the test model: a misleading scene)")
    demo.add_argument("--scene", default=None, metavar="SPLIT[:INDEX]", help="a scene of the test model's world")
    demo.add_argument("--prompt", default=None, help="answer this once and exit (empty: the caption prompt)")
    demo.add_argument("--method", default="vcd", help="methods, e.g. vhr, pai+vhr; none: plain only (default vcd)")
    demo.add_argument("--config", default=None, help="JSON of method fields, as in eval (or a JSON file)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="decoding: max_tokens, beams, sample, ...")
    demo.add_argument("--max-new-tokens", type=_count, default=None, help="tokens per answer (default 48)")
    demo.add_argument("--compare", action="store_true", help="one-shot: the plain answer beside the guarded one")
    demo.add_argument("--json", action="store_true", help="one-shot: print the result as JSON")
    demo.add_argument("--save-attention", default=None, metavar="FILE.png", help="one-shot: save the attention map")
    demo.set_defaults(func=_cmd_demo)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = text[0] if text else type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror:
        message = f"{err.filename}: {err.strerror}"
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Interrupts() as interrupts:
        args.checkpoint = interrupts.check  # long runs stop between batches on a Ctrl-C something swallowed
        code = _run(args, interrupts)
    return code


def _run(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """The command, with its errors as one line; a run during which a Ctrl-C came is interrupted,
    whatever became of the ``KeyboardInterrupt`` (see ``halluguard.interrupts``)."""
    debug = getattr(args, "debug", False)
    interrupted = "halluguard: interrupted" + ("; rerun the same command to resume" if args.command == "eval" else "")
    try:
        code = args.func(args)
        if args.command != "demo":  # the demo's session takes Ctrl-C as "stop this answer" and goes on
            interrupts.check()
        return code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except UsageError as err:
        if debug:
            raise
        print(f"halluguard: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        if interrupts.count:  # the interrupt became another error (an import it stopped midway)
            print(interrupted, file=sys.stderr)
            return 130
        from .eval.runner import EvalError

        known = isinstance(err, (EvalError, ModelError, ValueError, OSError))
        prefix = "" if known else f"{type(err).__name__}: "
        hint = "" if known else " (--debug shows the traceback)"
        print(f"halluguard: error: {prefix}{_one_line(err)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
