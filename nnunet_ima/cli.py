"""``nnunet-ima``: the umbrella command.

Subcommands live in their own modules, each exposing ``configure(parser)`` and ``run(args)``;
they are imported only when chosen, so ``nnunet-ima trainer-dir`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from typing import Optional, Sequence

from nnunet_ima.errors import UserInputError

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
    "make-synthetic": ("nnunet_ima.commands.make_synthetic",
                       "write a small synthetic nnU-Net raw dataset"),
}


def _version() -> str:
    try:
        return importlib.metadata.version("nnunet-ima")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-ima",
        description="IMA (Increasing-Margin Adversarial) training for nnU-Net v2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        try:
            importlib.import_module(module).configure(sp)
        except ModuleNotFoundError as e:  # a subcommand module that is not installed
            if e.name != module:
                raise
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserInputError as e:
        print(f"nnunet-ima {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
