"""The learning rate of the nnU-Net trainers, epoch by epoch, with an optional linear warmup.

nnU-Net sets the learning rate once per epoch, ``lr_scheduler.step(current_epoch)`` at the start
of the epoch, from the epoch number alone (a resumed run gets the same rates). With
``lr_warmup_epochs`` ``N > 0`` (settings) the rate of epoch ``e`` is

* ``e < N``: ``initial_lr * (e + 1) / (N + 1)``: a straight line from ``initial_lr / (N + 1)``
  whose next point, epoch ``N``, is ``initial_lr``; every warmup epoch is below ``initial_lr``;
* ``e >= N``: the schedule of ``lr_schedule`` over the epochs that remain, as if the run started
  at epoch ``N`` and lasted ``num_epochs - N`` epochs: poly
  ``initial_lr * (1 - (e - N) / (num_epochs - N)) ** 0.9`` (nnU-Net's exponent), or
  ``initial_lr`` for ``"constant"``.

nnU-Net's own ``nnUNetTrainer_warmup`` ramps ``initial_lr * (e + 1) / N`` instead, which reaches
``initial_lr`` in the last warmup epoch (one warmup epoch is then no warmup at all), and then
runs poly over the remaining epochs too (``PolyLRScheduler_offset``), as here. With ``N = 0``
the trainers keep nnU-Net's own scheduler object, so their rates stay bit-identical.
"""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler

POLY_EXPONENT = 0.9  # nnU-Net's PolyLRScheduler default


def warmup_learning_rate(epoch: int, initial_lr: float, num_epochs: int, warmup_epochs: int,
                         exponent: float = POLY_EXPONENT) -> float:
    """The learning rate of ``epoch`` (0-based) under the schedule of the module docstring.

    ``exponent`` 0.9 is poly, 0 is constant. ``warmup_epochs >= num_epochs`` is allowed: the
    whole run then ramps up (a smoke test of a fine-tuning recipe with one epoch).
    """
    if epoch < warmup_epochs:
        return initial_lr * (epoch + 1) / (warmup_epochs + 1)
    return initial_lr * (1 - (epoch - warmup_epochs) / (num_epochs - warmup_epochs)) ** exponent


class WarmupLRScheduler(_LRScheduler):
    """nnU-Net's ``PolyLRScheduler`` with the warmup of :func:`warmup_learning_rate` in front.

    Used like nnU-Net's schedulers: ``step(epoch)`` sets every parameter group's rate to that
    epoch's; ``step()`` advances an internal counter (the constructor's first call sets epoch
    0's rate).
    """

    def __init__(self, optimizer: Optimizer, initial_lr: float, num_epochs: int,
                 warmup_epochs: int, exponent: float = POLY_EXPONENT):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.num_epochs = num_epochs
        self.warmup_epochs = warmup_epochs
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = warmup_learning_rate(current_step, self.initial_lr, self.num_epochs,
                                      self.warmup_epochs, self.exponent)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr
