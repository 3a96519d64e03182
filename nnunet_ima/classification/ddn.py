"""DDN, the Decoupled Direction and Norm L2 attack (Rony et al., CVPR 2019, Algorithm 1).

DDN searches for the smallest L2 perturbation that fools the model. Each iteration takes a
normalised gradient step on the cross-entropy (the *direction*) and then rescales the
perturbation to a norm ``eps_k`` that shrinks by ``(1 - gamma)`` while the iterate is adversarial
and grows by ``(1 + gamma)`` while it is not (the *norm*). The smallest adversarial iterate seen
is returned.

Scale: the paper's constants (first norm 1, step 1 cosine-annealed to 0.01) are for images
whose budgets are of order 1. Here they are relative to ``max_norm``: the first norm is
``max_norm`` and the step anneals from ``max_norm`` to ``0.01 * max_norm``, so the attack behaves
the same on Moons points (budget 0.3) and on images (budget 2-30).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.model_mode import attack_mode
from nnunet_ima.norms import clamp_to_range, per_sample_norm, project


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def ddn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float, steps: int = 100,
        gamma: float = 0.05, clamp: Optional[Tuple[float, float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimal-norm L2 adversarial examples within ``max_norm``.

    Args:
        model: returns logits ``(B, K)``; run in eval mode with frozen parameters, restored after.
        x: ``(B, ...)`` inputs; ``y``: ``(B,)`` labels.
        max_norm: the largest L2 norm an iterate may have (the training budget).
        steps: iterations (the DDN paper trained with 100).
        gamma: the factor by which the norm shrinks or grows per iteration.
        clamp: the valid input range, or ``None`` for unbounded inputs.

    Returns:
        ``(x_adv, found)``: ``x_adv (B, ...)`` is the smallest adversarial iterate of each sample
        that was fooled (``found (B,)`` bool) and the last iterate (norm ``<= max_norm``) of the
        others, which is the strongest point DDN reached for them.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    x = x.detach()
    batch = x.shape[0]
    delta = torch.zeros_like(x)
    norm = torch.full((batch,), float(max_norm), device=x.device, dtype=x.dtype)
    best = x.clone()
    best_norm = torch.full((batch,), math.inf, device=x.device, dtype=x.dtype)
    found = torch.zeros(batch, dtype=torch.bool, device=x.device)
    with attack_mode(model):
        for k in range(steps):
            x_k = clamp_to_range(x + delta, clamp).requires_grad_(True)
            logits = model(x_k)
            adversarial = logits.argmax(1) != y
            l2 = per_sample_norm(x_k.detach() - x, "l2")
            better = adversarial & (l2 < best_norm)
            best[better] = x_k.detach()[better]
            best_norm[better] = l2[better]
            found |= adversarial
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_k)
            step = max_norm * (0.01 + 0.99 * (1 + math.cos(math.pi * k / steps)) / 2)
            grad_norm = per_sample_norm(grad, "l2").clamp_min(1e-12)
            delta = delta + step * grad / _view(grad_norm, grad)
            norm = torch.where(adversarial, norm * (1 - gamma), norm * (1 + gamma))
            norm = norm.clamp(max=max_norm)
            delta_norm = per_sample_norm(delta, "l2").clamp_min(1e-12)
            delta = delta * _view(norm / delta_norm, delta)
            delta = clamp_to_range(x + delta, clamp) - x
        x_last = clamp_to_range(x + project(delta, norm.new_full((batch,), max_norm), "l2"), clamp)
        with torch.no_grad():
            last_adversarial = model(x_last).argmax(1) != y
        l2 = per_sample_norm(x_last - x, "l2")
        better = last_adversarial & (l2 < best_norm)
        best[better] = x_last[better]
        found |= last_adversarial
    return torch.where(_view(found, x), best, x_last).detach(), found
