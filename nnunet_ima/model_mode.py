"""A context manager that prepares a network for an attack and restores it afterwards."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Freeze the parameters (and, by default, switch to eval mode) for the duration of an attack.

    The attack differentiates with respect to the input only: turning ``requires_grad`` off
    on the parameters saves their gradient computation and guarantees that no gradient is
    accumulated into ``.grad``. Autocast is disabled because half precision can zero the small
    input gradients that PGD normalises. On exit every module's ``training`` flag and every
    parameter's ``requires_grad`` flag are put back exactly as they were.
    """
    training_flags = [(m, m.training) for m in model.modules()]
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        if eval_mode:
            model.eval()
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield model
    finally:
        for m, flag in training_flags:
            m.training = flag
        for p, flag in grad_flags:
            p.requires_grad_(flag)
