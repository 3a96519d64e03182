"""``nnunet-ima``: the umbrella command.

Subcommands live in their own modules, each exposing ``configure(parser)`` and ``run(args)``;
they are imported only when chosen, so ``nnunet-ima trainer-dir`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-ima",
        description="IMA (Increasing-Margin Adversarial) training for nnU-Net v2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=DefaultsHelpFormatter)
        sp.set_defaults(_module=module)
        try:
            importlib.import_module(module).configure(sp)
        except ModuleNotFoundError as e:  # a subcommand module that is not installed
            if e.name != module:
                raise
    return parser


def _run(args: argparse.Namespace) -> int:
    for name, option in OUTPUT_FOLDERS.get(args.command, {}).items():
        check_output_folder(getattr(args, name), option)
    return importlib.import_module(args._module).run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"nnunet-ima {args.command}", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
