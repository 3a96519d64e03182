"""``nnunet-ima``: the umbrella command.

Subcommands live in their own modules, each exposing ``configure(parser)`` and ``run(args)``;
only the chosen one is imported, so ``nnunet-ima trainer-dir`` stays instant (``demo`` and
``ablation`` import torch).

A command line without a command, or with an option or command that does not exist, is answered
with the list of commands and argparse's exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import Optional, Sequence

from nnunet_ima import installed_version
from nnunet_ima.errors import run_command
from nnunet_ima.help_format import DefaultsHelpFormatter
from nnunet_ima.io import check_output_folder

# name -> (module, one-line help)
SUBCOMMANDS = {
    "trainer-dir": ("nnunet_ima.commands.trainer_dir",
                    "print the folder to put in nnUNet_extTrainer"),
    "split": ("nnunet_ima.commands.split",
              "hold out test cases (test_cases.json) and write nnU-Net's cross-validation folds "
              "without them (splits_final.json)"),
    "demo": ("nnunet_ima.commands.demo",
             "train plain nnU-Net, Adv and IMA on a small synthetic dataset and print robustness tables"),
    "ablation": ("nnunet_ima.commands.ablation",
                 "train Clean, Adv budgets and IMA recipes side by side, attack them, and "
                 "tabulate clean vs robust Dice"),
    "ablation-summary": ("nnunet_ima.commands.ablation_summary",
                         "the ablations of several datasets side by side, and the IMA reading no "
                         "baseline dominates on the most of them"),
    "make-synthetic": ("nnunet_ima.commands.make_synthetic",
                       "write a small synthetic nnU-Net raw dataset"),
    "check-config": ("nnunet_ima.commands.check_config",
                     "check a NNUNET_IMA_CONFIG settings file and print the settings a training "
                     "would use"),
}

# subcommand -> {argument name: option} of the folders it writes into. They are checked here,
# before the subcommand runs, so that a file or an unwritable place given as a folder is one
# clear error before any work (and the subcommands need not each repeat the check).
OUTPUT_FOLDERS = {
    "demo": {"workdir": "--workdir"},
    "ablation": {"workdir": "--workdir"},
}


class _Parser(argparse.ArgumentParser):
    """The top-level parser: its errors end with the list of commands."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n\n{command_list()}\n")


def command_list() -> str:
    """The commands and their help, as ``nnunet-ima -h`` lists them."""
    width = max(map(len, SUBCOMMANDS))
    lines = ["commands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines += textwrap.wrap(help_text, 96, initial_indent=f"  {name:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``nnunet-ima``; with ``command``, only that subcommand's module is imported
    and its options configured (the others are listed but empty), else every subcommand's."""
    parser = _Parser(
        prog="nnunet-ima",
        description="IMA (Increasing-Margin Adversarial) training for nnU-Net v2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    # Not required: argparse would report a missing COMMAND before an unknown option (main()
    # answers a missing command itself).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=argparse.ArgumentParser)
    parser.commands = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=DefaultsHelpFormatter)
        sp.set_defaults(_module=module)
        parser.commands[name] = sp
        if command is not None and name != command:
            continue
        try:
            importlib.import_module(module).configure(sp)
        except ModuleNotFoundError as e:  # a subcommand module that is not installed
            if e.name != module:
                raise
    return parser


def _chosen(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named on the command line: its first word that is not an option (the
    top-level options take no values)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def _run(args: argparse.Namespace) -> int:
    for name, option in OUTPUT_FOLDERS.get(args.command, {}).items():
        check_output_folder(getattr(args, name), option)
    return importlib.import_module(args._module).run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen(argv)
    parser = build_parser(command or "")  # no command: configure none
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the chosen command's usage, or without one the list of commands
        options = [a for a in unknown if a.startswith("-")]
        (parser.commands[args.command] if args.command else parser).error(
            f"unknown option{'s' * (len(options) > 1)} {' '.join(options)}" if options else
            f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:  # `nnunet-ima` alone: what can it do?
        parser.print_usage(sys.stderr)
        print(f"nnunet-ima: error: choose a COMMAND\n\n{command_list()}\n\nnnunet-ima COMMAND "
              f"-h shows a command's options.", file=sys.stderr)
        return 2
    return run_command(f"nnunet-ima {args.command}", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
