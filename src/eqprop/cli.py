"""`eqprop` command line: one subcommand per job.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs. Positional
arguments (a config, `key=value` overrides) and flags mix in any order.

A user error (a bad config key or value, a missing or damaged file, a folder holding another
run, a failing training step) is printed as one line naming the key, file or setting, and
the exit status is 2; `eqprop --debug COMMAND ...` also prints the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

__all__ = ["COMMANDS", "EXIT_USER_ERROR", "build_parser", "main", "user_errors"]

# command -> (module, one-line help)
COMMANDS = {
    "gradcheck": ("eqprop.gradcheck", "compare ep / id / bptt gradients with finite differences"),
    "train": ("eqprop.training.cli_train", "train a model from a named config with key=value overrides"),
    "eval": ("eqprop.training.cli_eval", "evaluate a checkpoint on its test set"),
    "data": ("eqprop.data.cli", "dataset utilities (fetch, info)"),
    "analyze": ("eqprop.analysis.cli", "analyses: gdd (static gradients), splitting, rhel, fidelity"),
    "report": ("eqprop.training.cli_report", "a results page (markdown) written from training run folders"),
    "account": ("eqprop.analysis.account", "per-step account: MACs, memory, relaxations, conversions, energy"),
    "study": ("eqprop.studies.cli", "studies: algorithms (every learning rule, one network), precision (16-bit)"),
}
EXIT_USER_ERROR = 2  # as argparse's usage errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqprop", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)  # its own arguments are added when it runs
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that report a user's mistake (not a bug in eqprop)."""
    from .data import DatasetError
    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError
    from .training.trainer import TrainingError

    return ConfigError, CheckpointError, TrainingError, DatasetError


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags and positionals in any order (argparse's intermixed parsing), except for
    commands whose arguments it cannot take (subcommands, a positional taking the rest of
    the line), which argparse parses the usual way."""
    fixed_order = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in parser._actions)
    return parser.parse_args(argv) if fixed_order else parser.parse_intermixed_args(argv)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error
        return EXIT_USER_ERROR
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"eqprop {name}", description=help_text)
    module.add_arguments(sub)
    args = _parse(sub, argv[1:])
    errors = user_errors()
    try:
        return int(module.run(args) or 0)
    except errors as e:
        if debug:
            traceback.print_exc()
        print(f"eqprop {name}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
