"""The ``halluguard`` console script."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .adapters import ADAPTERS
from .registry import entry, list_methods


def _cmd_methods(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_methods()
    for name in names:
        item = entry(name)
        status = "available" if item.available else "config only (implementation not shipped yet)"
        print(f"{name:10s} {item.summary}  [{status}]")
        if args.name or args.verbose:
            for field, default, doc in item.config_cls.describe():
                print(f"    {field:22s} = {default!r:12s} {doc}")
            print(f"    neutral: {item.config_cls.neutral_overrides}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    for model_type, adapter in sorted(ADAPTERS.items()):
        print(f"{model_type:16s} {adapter.family}")
    return 0


def _settings(args: argparse.Namespace, max_new_tokens: int):
    from .eval.runner import Settings

    return Settings(
        max_new_tokens=args.max_new_tokens or max_new_tokens,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )


def method_configs(spec: str, overrides: str | None) -> list:
    """Configs for ``spec`` ("a+b") with JSON overrides: ``{"field": v}`` for one method, or
    ``{"name": {"field": v}}`` per method; ``overrides`` may also be a JSON file."""
    from .registry import get_config

    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not overrides:
        return [get_config(n) for n in names]
    text = Path(overrides).read_text() if Path(overrides).is_file() else overrides
    data = json.loads(text)
    if not all(isinstance(v, dict) for v in data.values()) or not set(data) <= set(names):
        if len(names) != 1:
            raise ValueError("with several methods, --config must map each method name to its fields")
        data = {names[0]: data}
    return [get_config(n, **data.get(n, {})) for n in names]


def _cmd_eval(args: argparse.Namespace) -> int:
    from .api import wrap
    from .eval import runner

    methods = method_configs(args.method or "", args.config)
    model, processor, name = runner.load_model(args.model, dtype=args.dtype, device=args.device)
    out = Path(args.out) if args.out else runner.default_out_dir(f"{args.task}-{args.dataset}", name, args.method or "")
    guard = wrap(model, processor, methods) if methods else None
    try:
        if args.task == "chair":
            results = runner.run_chair(
                model,
                processor,
                name,
                out,
                guard,
                dataset=args.dataset,
                coco_images=args.coco_images,
                image_ids=args.image_ids,
                num_images=args.num_images,
                seed=args.seed,
                prompt=args.prompt,
                settings=_settings(args, 64 if args.short else 512),
                short=args.short,
                split=args.split,
            )
        else:
            results = runner.run_pope(
                model,
                processor,
                name,
                out,
                guard,
                dataset=args.dataset,
                splits=args.splits,
                coco_images=args.coco_images,
                num_questions=args.num_questions,
                seed=args.seed,
                rule=args.answer_rule,
                suffix=args.prompt_suffix,
                settings=_settings(args, 10),
                num_images=args.num_images,
            )
    finally:
        if guard is not None:
            guard.unwrap()
    if results is not None:
        from .eval.report import chair_table, pope_table

        print((chair_table if args.task == "chair" else pope_table)([results]))
        print(f"results: {out / 'results.json'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .eval.report import report

    print(report(args.runs, chart=args.chart))
    if args.chart:
        print(f"chart: {args.chart}")
    return 0


def _add_eval_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="CHAIR and POPE evaluation")
    tasks = ev.add_subparsers(dest="task", required=True)
    for task in ("chair", "pope"):
        p = tasks.add_parser(task, help=f"run {task.upper()} with a method composition (or none)")
        p.add_argument(
            "--model",
            default="testbed",
            help="hub id or local path of a supported LVLM, or 'testbed' (the shipped test model; default)",
        )
        p.add_argument("--method", default="", help="method spec, e.g. 'pai' or 'pai+var' (default: none, vanilla)")
        p.add_argument("--config", help="JSON (or a JSON file) of config overrides, e.g. '{\"alpha\": 0.5}'")
        p.add_argument(
            "--dataset",
            default=None,
            help="coco (needs --coco-images) or testbed (the synthetic world); "
            "POPE also aokvqa, gqa. Default: testbed for the test model, else coco",
        )
        p.add_argument("--coco-images", help="folder of COCO val2014 images")
        p.add_argument("--out", help="run folder (default runs/<task>-<dataset>-<model>-<method>); a rerun resumes")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-new-tokens", type=int, default=None)
        p.add_argument("--num-beams", type=int, default=1)
        p.add_argument("--do-sample", action="store_true")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--num-images", type=int, default=500)
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
        p.add_argument("--device", default=None, help="e.g. cuda:0 (default: where the model loads)")
        p.set_defaults(func=_cmd_eval)
        if task == "chair":
            p.add_argument(
                "--short", action="store_true", help="64-token regime: 64 tokens, drop a last unfinished sentence"
            )
            p.add_argument(
                "--image-ids", default="opera", help="'opera' (the standard 500), 'seeded', or a file of ids"
            )
            p.add_argument("--prompt", default="Please describe this image in detail.")
            p.add_argument("--split", default="misleading", help="testbed split: test or misleading")
        else:
            p.add_argument("--splits", nargs="+", default=["random", "popular", "adversarial"])
            p.add_argument("--num-questions", type=int, default=None, help="first N questions per split")
            p.add_argument("--answer-rule", default="pope", choices=["pope", "opera", "vcd"])
            p.add_argument("--prompt-suffix", default="", help="text appended to each question")
    rep = tasks.add_parser("report", help="compare runs: markdown table and bar chart")
    rep.add_argument("runs", nargs="+", help="run folders (or results.json files)")
    rep.add_argument("--chart", help="save a bar chart (PNG) here")
    rep.set_defaults(func=_cmd_report)


def _cmd_calibrate_sink_dims(args: argparse.Namespace) -> int:
    from .calibrate.sink_dims import main as sink_dims

    return sink_dims(args.model, args.out, args.tau, args.top)


def _add_calibrate_parsers(sub) -> None:
    cal = sub.add_parser("calibrate", help="offline calibration for methods that need model-specific data")
    tools = cal.add_subparsers(dest="tool", required=True)
    dims = tools.add_parser("sink-dims", help="massive-activation dimensions of the text backbone (for VAR)")
    dims.add_argument("--model", required=True, help="hub id or local path, or 'testbed'")
    dims.add_argument("--out", help="save the result as JSON here")
    dims.add_argument("--tau", type=float, default=20.0, help="score threshold (VAR's tau)")
    dims.add_argument("--top", type=int, default=2, help="how many dimensions to keep at most")
    dims.set_defaults(func=_cmd_calibrate_sink_dims)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halluguard", description="Decoding-time hallucination mitigation for HuggingFace vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"halluguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser("methods", help="list the methods and their configuration fields")
    methods.add_argument("name", nargs="?", help="show one method's fields")
    methods.add_argument("-v", "--verbose", action="store_true", help="show every method's fields")
    methods.set_defaults(func=_cmd_methods)
    models = sub.add_parser("models", help="list the supported model types (config.model_type)")
    models.set_defaults(func=_cmd_models)
    _add_eval_parsers(sub)
    _add_calibrate_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is _cmd_eval and args.dataset is None:
        args.dataset = "testbed" if args.model == "testbed" else "coco"
    try:
        return args.func(args)
    except ValueError as err:
        print(f"halluguard: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
