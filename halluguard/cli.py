"""The ``halluguard`` console script."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="halluguard", description="Decoding-time hallucination mitigation for "
                                     "HuggingFace vision-language models.")
    parser.add_argument("--version", action="version", version=f"halluguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser("methods", help="list the methods and their configuration fields")
    methods.add_argument("name", nargs="?", help="show one method's fields")
    methods.add_argument("-v", "--verbose", action="store_true", help="show every method's fields")
    methods.set_defaults(func=_cmd_methods)
    models = sub.add_parser("models", help="list the supported model types (config.model_type)")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"halluguard: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
