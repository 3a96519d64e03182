"""``nnunet-ima trainer-dir``: print the folder nnU-Net must search for the IMA trainers.

Usage: ``export nnUNet_extTrainer=$(nnunet-ima trainer-dir)``
"""
import argparse

from nnunet_ima.nnunet.paths import trainer_dir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "usage in a shell: export nnUNet_extTrainer=$(nnunet-ima trainer-dir)"


def run(args: argparse.Namespace) -> int:
    print(trainer_dir())
    return 0
