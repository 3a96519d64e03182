"""Checks that a model can be attacked meaningfully, run before any attack (as AutoAttack does).

A model that hides its gradients, answers at random or returns probabilities would make PGD
look weak and the robustness table look good; each failure stops the evaluation with its cause.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.model_mode import attack_mode

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.robustness import AttackSettings, attack_loss, batch_size_for
from nnunet_ima.evaluation.samples import SliceSample


def preflight(name: str, network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              loss_fn: Callable) -> None:
    """``x``: ``(B, C, *spatial)`` test slices or volumes, ``y``: ``(B, 1, *spatial)`` labels.

    Raises:
        UserInputError: outputs that look like probabilities, two forward passes that differ,
            or an input gradient that is zero or not finite.
    """
    with attack_mode(network), torch.no_grad():
        first = network(x)
        second = network(x)
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        raise UserInputError(f"{name}: two forward passes on the same input differ (max "
                             f"{(first - second).abs().max():.3g}); the network is random in eval "
                             f"mode (dropout? stochastic layers?), so attack results would not be "
                             f"reproducible")
    if not torch.isfinite(first).all():
        raise UserInputError(f"{name}: the network returns NaN or inf; check the checkpoint and "
                             f"the input images (NaN in the data?)")
    sums = first.sum(dim=1)
    if first.min() >= 0 and first.max() <= 1 and torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise UserInputError(f"{name}: the outputs are probabilities (non-negative, summing to 1 "
                             f"over classes); the attack needs logits. Remove the final softmax.")
    with attack_mode(network):
        x_grad = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(network(x_grad), y).sum(), x_grad)
    if not torch.isfinite(grad).all():
        raise UserInputError(f"{name}: the input gradient holds NaN or inf")
    if grad.abs().max() == 0:
        raise UserInputError(f"{name}: the input gradient is zero everywhere (gradient masking, "
                             f"or a non-differentiable layer); PGD cannot measure robustness")


def preflight_models(models: Sequence[LoadedModel], samples: Dict[str, List[SliceSample]],
                     settings: AttackSettings, device: torch.device) -> None:
    """:func:`preflight` every model on its first batch: up to ``settings.batch_size`` of its
    slices of the first slice's shape (its first volume in 3D, attacked alone as the attacks
    do), with the loss the attack maximises."""
    for m in models:
        first = samples[m.name][0]
        same_shape = [s for s in samples[m.name] if s.image.shape == first.image.shape]
        batch = same_shape[: batch_size_for(same_shape, settings.batch_size)]
        x = torch.from_numpy(np.stack([s.image for s in batch])).to(device)
        y = torch.from_numpy(np.stack([s.label for s in batch])[:, None].astype(np.int64)).to(device)
        # SegPGD maximises a (weighted) CE: check the gradient of the CE for it.
        loss = "ce" if settings.attack == "segpgd" else settings.loss
        preflight(m.name, m.network, x, y, attack_loss(loss, m.ignore_label))
