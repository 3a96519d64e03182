"""The paper's classification evaluation: 100-step PGD twice per noise level.

At each noise level every test sample is attacked once maximising the cross-entropy and once
maximising the margin loss (largest other logit minus the true logit), each with a random start
and step ``noise / 10``. A sample counts as robust only if it is classified correctly without
noise and *neither* attack fools it. An attack's iterate that fools the model is kept and the
sample leaves that attack's loop (``stop_if``): later steps could only move it, never make the
sample robust again, so this saves time without changing any result. Clean-misclassified samples
are wrong at every level and are not attacked.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from nnunet_ima.attacks import pgd
from nnunet_ima.classification.datasets import as_float
from nnunet_ima.metrics import robustness_auc

ATTACK_LOSSES = ("ce", "margin")
WORST = "worst"


def _misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1) != y


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def fooled_by(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, loss: str,
              norm: str, steps: int, clamp: Optional[Tuple[float, float]],
              generator: torch.Generator) -> torch.Tensor:
    """``(B,)`` bool: PGD with ``loss`` inside the ``noise`` ball makes the prediction wrong.

    ``x``: ``(B, ...)`` model inputs, ``y``: ``(B,)`` labels. ``steps`` iterations of size
    ``noise / 10`` (``alpha = steps / 10``), random start.
    """
    if noise == 0:
        return _predict(model, x) != y
    x_adv = pgd(model, x, y, noise, norm=norm, steps=steps, alpha=steps / 10, loss=loss,
                clamp=clamp, stop_if=_misclassified, generator=generator)
    return _predict(model, x_adv) != y


def robust_accuracy(model: torch.nn.Module, x_stored: torch.Tensor, y: torch.Tensor,
                    noise_levels: Sequence[float], norm: str = "l2", steps: int = 100,
                    attacks: Sequence[str] = ATTACK_LOSSES,
                    clamp: Optional[Tuple[float, float]] = (0.0, 1.0), batch_size: int = 256,
                    seed: int = 0, device: torch.device = torch.device("cpu"),
                    progress: bool = False) -> Dict[str, Dict[float, float]]:
    """Accuracy under each attack alone and under their worst case, per noise level.

    Args:
        x_stored: ``(N, ...)`` stored test samples (uint8 images or float points); ``y``: ``(N,)``.
        noise_levels: budgets in ``norm`` (0 = clean accuracy).
        attacks: attack losses, a subset of :data:`ATTACK_LOSSES`.
        clamp: the valid input range (``None`` for unbounded inputs such as moons points).
        seed: seeds the random starts; an attack on batch ``b`` draws the same starts whichever
            other attacks run beside it.

    Returns:
        ``{"worst": {noise: acc}, "ce": {noise: acc}, "margin": {noise: acc}}``, accuracies in
        ``[0, 1]`` over all ``N`` samples.
    """
    unknown = [a for a in attacks if a not in ATTACK_LOSSES]
    if unknown or not attacks:
        raise ValueError(f"attacks must be a non-empty subset of {ATTACK_LOSSES}, got {list(attacks)}")
    model.eval()
    robust = {name: {n: 0 for n in noise_levels} for name in (*attacks, WORST)}
    batches = range(0, len(x_stored), batch_size)
    bar = tqdm(total=len(batches) * len(noise_levels), desc="100-PGD" if steps == 100 else "PGD",
               leave=False, disable=not progress)
    for b, start in enumerate(batches):
        x = as_float(x_stored[start:start + batch_size]).to(device)
        yb = y[start:start + batch_size].to(device)
        correct = (_predict(model, x) == yb).nonzero().flatten()
        x_ok, y_ok = x[correct], yb[correct]
        for noise in noise_levels:
            still_robust = torch.ones(len(correct), dtype=torch.bool, device=device)
            for name in attacks:
                if len(correct):
                    g = torch.Generator().manual_seed(
                        seed * 1_000_003 + b * 101 + ATTACK_LOSSES.index(name))
                    fooled = fooled_by(model, x_ok, y_ok, float(noise), name, norm, steps, clamp, g)
                else:
                    fooled = torch.zeros(0, dtype=torch.bool, device=device)
                robust[name][noise] += int((~fooled).sum())
                still_robust &= ~fooled
            robust[WORST][noise] += int(still_robust.sum())
            bar.update(1)
    bar.close()
    n = max(len(x_stored), 1)
    return {name: {noise: count / n for noise, count in per.items()} for name, per in robust.items()}


def auc_of(accuracies: Dict[float, float]) -> Optional[float]:
    """``robustness_auc`` of ``{noise: accuracy}``; ``None`` with fewer than two levels."""
    levels = sorted(accuracies)
    if len(levels) < 2 or levels[-1] <= 0:
        return None
    return robustness_auc(levels, [accuracies[n] for n in levels])
