"""`eqprop` command line: one subcommand per job.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

# command -> (module, one-line help)
COMMANDS = {
    "gradcheck": ("eqprop.gradcheck", "compare ep / id / bptt gradients with finite differences"),
    "train": ("eqprop.training.cli_train", "train a model from a named config with key=value overrides"),
    "eval": ("eqprop.training.cli_eval", "evaluate a checkpoint on its test set"),
    "data": ("eqprop.data.cli", "dataset utilities (fetch, info)"),
    "analyze": ("eqprop.analysis.cli", "analyses: gdd (static gradients), splitting, rhel"),
    "study": ("eqprop.studies.cli", "studies: algorithms (every learning rule, one network), precision (16-bit)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)  # its own arguments are added when it runs
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"eqprop {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
