"""The paper's classification evaluation (100-step PGD twice) and stronger attacks beside it.

At each noise level every test sample is attacked by each attack chosen from
:data:`~nnunet_ima.classification.strong_attacks.ATTACKS`: by default once with 100-step PGD
maximising the cross-entropy and once maximising the margin loss (largest other logit minus the
true logit), each with a random start and step ``noise / 10``; optionally also APGD-CE,
APGD-DLR and SPSA. A sample counts as robust only if it is classified correctly without noise
and *no* attack fools it (the worst case). An attack's iterate that fools the model is kept and
the sample leaves that attack's loop: later steps could only move it, never make the sample
robust again, so this saves time without changing any result. Clean-misclassified samples are
wrong at every level and are not attacked. Every attack runs on every clean-correct sample, so
each attack's own accuracy is reported too.

Gradient masking check: when the PGD worst case (robust against every PGD loss run) is more
than 2 points above the accuracy under a stronger attack, PGD's gradients did not lead it to
errors that exist, the sign of masked or obfuscated gradients; :func:`masking_warnings` lists
those levels.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from nnunet_ima.classification.datasets import as_float
from nnunet_ima.classification.strong_attacks import (ATTACKS, PGD_ATTACKS, StrongAttackSettings,
                                                      caption)
from nnunet_ima.metrics import robustness_auc

ATTACK_LOSSES = PGD_ATTACKS
"""The paper's two PGD losses, the default attacks."""
WORST = "worst"
PGD_WORST = "pgd"
"""Result key: robust against every PGD loss run (present when at least one ran)."""
MASKING_THRESHOLD_POINTS = 2.0


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def robust_accuracy(model: torch.nn.Module, x_stored: torch.Tensor, y: torch.Tensor,
                    noise_levels: Sequence[float], norm: str = "l2", steps: int = 100,
                    attacks: Sequence[str] = ATTACK_LOSSES,
                    clamp: Optional[Tuple[float, float]] = (0.0, 1.0), batch_size: int = 256,
                    seed: int = 0, device: torch.device = torch.device("cpu"),
                    progress: bool = False,
                    settings: Optional[StrongAttackSettings] = None) -> Dict[str, Dict[float, float]]:
    """Accuracy under each attack alone and under their worst case, per noise level.

    Args:
        x_stored: ``(N, ...)`` stored test samples (uint8 images or float points); ``y``: ``(N,)``.
        noise_levels: budgets in ``norm`` (0 = clean accuracy).
        steps: PGD and APGD iterations.
        attacks: names from :data:`~nnunet_ima.classification.strong_attacks.ATTACKS`.
        clamp: the valid input range (``None`` for unbounded inputs such as moons points).
        seed: seeds the attacks' randomness; an attack on batch ``b`` draws the same numbers
            whichever other attacks run beside it.
        settings: APGD restarts and SPSA settings (defaults: :class:`StrongAttackSettings`).

    Returns:
        ``{"worst": {noise: acc}, "<attack>": {noise: acc} for each attack, "pgd": {...}}``,
        accuracies in ``[0, 1]`` over all ``N`` samples; ``"pgd"`` (robust against every PGD
        loss run) only when a PGD loss ran.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks must be a non-empty subset of {tuple(ATTACKS)}, got {list(attacks)}")
    settings = (settings or StrongAttackSettings()).validate()
    pgd_run = [a for a in attacks if a in PGD_ATTACKS]
    model.eval()
    keys = (*attacks, WORST, *((PGD_WORST,) if pgd_run else ()))
    robust = {name: {n: 0 for n in noise_levels} for name in keys}
    batches = range(0, len(x_stored), batch_size)
    bar = tqdm(total=len(batches) * len(noise_levels) * len(attacks), leave=False,
               desc=caption(attacks, steps), disable=not progress)
    for b, start in enumerate(batches):
        x = as_float(x_stored[start:start + batch_size]).to(device)
        yb = y[start:start + batch_size].to(device)
        correct = (_predict(model, x) == yb).nonzero().flatten()
        x_ok, y_ok = x[correct], yb[correct]
        for noise in noise_levels:
            fooled_by = {}
            for name in attacks:
                if len(correct):
                    # The registry index, not the position in `attacks`, keeps each attack's
                    # draws independent of which other attacks run.
                    attack_seed = seed * 1_000_003 + b * 101 + list(ATTACKS).index(name)
                    fooled_by[name] = ATTACKS[name].fooled(
                        model, x_ok, y_ok, float(noise), norm=norm, steps=steps, clamp=clamp,
                        seed=attack_seed, settings=settings)
                else:
                    fooled_by[name] = torch.zeros(0, dtype=torch.bool, device=device)
                robust[name][noise] += int((~fooled_by[name]).sum())
                bar.update(1)
            robust[WORST][noise] += int((~_any(fooled_by.values(), len(correct), device)).sum())
            if pgd_run:
                pgd_fooled_any = _any([fooled_by[a] for a in pgd_run], len(correct), device)
                robust[PGD_WORST][noise] += int((~pgd_fooled_any).sum())
    bar.close()
    n = max(len(x_stored), 1)
    return {name: {noise: count / n for noise, count in per.items()} for name, per in robust.items()}


def _any(masks, length: int, device) -> torch.Tensor:
    out = torch.zeros(length, dtype=torch.bool, device=device)
    for m in masks:
        out |= m
    return out


def masking_warnings(result: Dict[str, Dict[float, float]], attacks: Sequence[str],
                     threshold_points: float = MASKING_THRESHOLD_POINTS) -> List[dict]:
    """Noise levels where the PGD worst case is more than ``threshold_points`` above the
    accuracy under the strongest non-PGD attack (a sign of gradient masking).

    Args:
        result: the output of :func:`robust_accuracy`; ``attacks``: the attacks it ran.

    Returns:
        One dict per flagged level, in increasing noise: ``noise``, ``pgd`` (its accuracy),
        ``attack`` (the strongest other attack's name), ``accuracy`` (under that attack) and
        ``points`` (the gap, percentage points). Empty when no PGD loss or no other attack ran.
    """
    others = [a for a in attacks if a not in PGD_ATTACKS]
    if PGD_WORST not in result or not others or len(others) == len(attacks):
        return []
    warnings = []
    for noise in sorted(result[PGD_WORST]):
        # The first attack in registry order wins ties, so the choice is reproducible.
        strongest = min(others, key=lambda a: (result[a][noise], list(ATTACKS).index(a)))
        gap = 100 * (result[PGD_WORST][noise] - result[strongest][noise])
        # A hair of tolerance: accuracies are count / n and 2 points can be hit exactly.
        if gap > threshold_points + 1e-9:
            warnings.append({"noise": noise, "pgd": result[PGD_WORST][noise], "attack": strongest,
                             "accuracy": result[strongest][noise], "points": gap})
    return warnings


def auc_of(accuracies: Dict[float, float]) -> Optional[float]:
    """``robustness_auc`` of ``{noise: accuracy}``; ``None`` with fewer than two levels."""
    levels = sorted(accuracies)
    if len(levels) < 2 or levels[-1] <= 0:
        return None
    return robustness_auc(levels, [accuracies[n] for n in levels])
