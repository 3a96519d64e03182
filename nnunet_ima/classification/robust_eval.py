"""The paper's classification evaluation: 100-step PGD twice (cross-entropy, margin loss).

At each noise level a sample counts as robust only if it is classified correctly without noise
and neither attack fools it (the worst case of the two). A sample that an attack has fooled
leaves that attack's loop (``stop_if``), which changes no result: a fooled iterate is kept.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from nnunet_ima.attacks import pgd
from nnunet_ima.classification.datasets import as_float
from nnunet_ima.metrics import robustness_auc

ATTACK_LOSSES = ("ce", "margin")


def _misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1) != y


@torch.no_grad()
def _predict(model, x):
    return model(x).argmax(dim=1)


def fooled_by(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, loss: str,
              norm: str, steps: int, clamp: Optional[Tuple[float, float]],
              generator: torch.Generator) -> torch.Tensor:
    """``(B,)`` bool: the PGD attack with ``loss`` at ``noise`` makes the prediction wrong."""
    if noise == 0:
        return _predict(model, x) != y
    # Step eps / 10 (the paper): alpha * eps / steps with alpha = steps / 10.
    x_adv = pgd(model, x, y, noise, norm=norm, steps=steps, alpha=steps / 10, loss=loss,
                clamp=clamp, stop_if=_misclassified, generator=generator)
    return _predict(model, x_adv) != y


def robust_accuracy(model: torch.nn.Module, x_stored: torch.Tensor, y: torch.Tensor,
                    noise_levels: Sequence[float], norm: str = "l2", steps: int = 100,
                    attacks: Sequence[str] = ATTACK_LOSSES, clamp=(0.0, 1.0),
                    batch_size: int = 256, seed: int = 0,
                    device: torch.device = torch.device("cpu")) -> Dict[str, dict]:
    """Per noise level: accuracy under each attack and under their worst case.

    Returns ``{"worst": {noise: acc}, "ce": {noise: acc}, "margin": {noise: acc}}`` with
    accuracies in ``[0, 1]`` (clean-misclassified samples count as wrong everywhere).
    """
    model.eval()
    counts = {name: {n: 0 for n in noise_levels} for name in (*attacks, "worst")}
    for start in range(0, len(x_stored), batch_size):
        x = as_float(x_stored[start:start + batch_size]).to(device)
        yb = y[start:start + batch_size].to(device)
        clean_wrong = _predict(model, x) != yb
        for noise in noise_levels:
            worst = clean_wrong.clone()
            for k, name in enumerate(attacks):
                g = torch.Generator(device=device).manual_seed(seed * 7919 + start * 31 + k)
                fooled = fooled_by(model, x, yb, float(noise), name, norm, steps, clamp, g) | clean_wrong
                counts[name][noise] += int((~fooled).sum())
                worst |= fooled
            counts["worst"][noise] += int((~worst).sum())
    n = max(len(x_stored), 1)
    return {name: {noise: c / n for noise, c in per.items()} for name, per in counts.items()}


def auc_of(accuracies: Dict[float, float]) -> Optional[float]:
    levels = sorted(accuracies)
    if len(levels) < 2 or levels[-1] <= 0:
        return None
    return robustness_auc(levels, [accuracies[n] for n in levels])
