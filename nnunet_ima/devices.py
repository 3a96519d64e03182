"""The ``--device`` option of every command: its default and its check."""
from __future__ import annotations

import argparse

import torch

from nnunet_ima.errors import UserInputError


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser: argparse.ArgumentParser, *flags: str) -> None:
    """``--device`` (or ``flags``, e.g. nnU-Net's ``-device`` beside it) defaulting to CUDA."""
    parser.add_argument(*(flags or ("--device",)), dest="device", default=default_device(),
                        help="torch device: cpu, cuda, cuda:1, ... (default: cuda when available)")


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or a :class:`UserInputError` naming the fix.

    Raises:
        UserInputError: ``name`` is not a device name, or it names CUDA on a machine without one.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserInputError(f"--device {name!r} is not a torch device; use cpu, cuda or "
                             f"cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {name} asked but no CUDA device is available; use "
                             f"--device cpu")
    return device
