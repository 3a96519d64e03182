"""``nnunet-ima trainer-dir``: print the folder nnU-Net must search for the IMA trainers.

Usage: ``export nnUNet_extTrainer=$(nnunet-ima trainer-dir)``
"""
import argparse
import os


def trainer_dir() -> str:
    """The installed folder of ``nnunet_ima.trainers`` (the repository's ``trainers/``)."""
    import nnunet_ima.trainers
    return os.path.dirname(os.path.abspath(nnunet_ima.trainers.__file__))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "usage in a shell: export nnUNet_extTrainer=$(nnunet-ima trainer-dir)"


def run(args: argparse.Namespace) -> int:
    print(trainer_dir())
    return 0
