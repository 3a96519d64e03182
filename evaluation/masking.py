"""Gradient-masking checks of a segmentation evaluation, run on a few slices after the main run.

A robustness number from gradient attacks is only as good as the gradients. As AutoAttack and
RobustBench do for classifiers, three symptoms are checked, each against the headline result:

* **black box beats white box**: a score-based random search (Square-style: random square
  windows of a shrinking size, accepted when the slice loss rises; it never sees a gradient)
  at one noise level must not leave a TVDI more than :data:`BLACK_BOX_POINTS` points below the
  white-box attacks' on the same slices;
* **monotonicity**: TVDI must not rise with the noise level (by more than
  :data:`MONOTONE_POINTS` points);
* **unbounded attack**: PGD at a budget far beyond any tested one (RMS :data:`UNBOUNDED_RMS`
  z-score units per pixel in L2, :data:`UNBOUNDED_RMS` in Linf), without a random start, driving
  every pixel to background (the run's steps, CE towards label 0), must bring TVDI under
  :data:`UNBOUNDED_TVDI`. It is targeted because an untargeted loss is content to turn every
  pixel into foreground, which keeps TVDI near ``2 |GT| / (|GT| + |slice|)``.

A check that fires yields a warning; the evaluator prints it and adds it as a footnote to the
tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_ima.attacks import run_pgd
from nnunet_ima.declared import Count, setting, validate_declared
from nnunet_ima.metrics import tvdi
from nnunet_ima.model_mode import attack_mode
from nnunet_ima.norms import per_sample_norm, per_sample_view, random_on_sphere

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.predictor_path import segmentation
from nnunet_ima.evaluation.robustness import (AttackSettings, NoiseResult, attack_loss,
                                              scored_counts)
from nnunet_ima.evaluation.samples import SliceSample

BLACK_BOX_POINTS = 2.0
MONOTONE_POINTS = 1.0
UNBOUNDED_RMS = 10.0
UNBOUNDED_TVDI = 0.05
DEFAULT_SLICES = 8
DEFAULT_QUERIES = 500


@dataclass(frozen=True)
class MaskingSettings:
    """``slices``: how many slices the black-box and unbounded checks attack (a seeded draw);
    ``queries``: forward passes of the random search per slice. Declared once
    (:mod:`nnunet_ima.declared`); out of range is an ``InvalidSetting``."""

    slices: int = setting(DEFAULT_SLICES, rule=Count(1),
                          help="slices of the black-box and unbounded checks (seeded draw)")
    queries: int = setting(DEFAULT_QUERIES, rule=Count(1),
                           help="forward passes of the black-box random search per slice")

    def __post_init__(self):
        validate_declared(self)


@dataclass
class MaskingReport:
    """The outcome of the checks of one model: the numbers of each check and its warnings."""

    black_box: dict = field(default_factory=dict)
    monotonicity: dict = field(default_factory=dict)
    unbounded: dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"black_box": self.black_box, "monotonicity": self.monotonicity,
                "unbounded": self.unbounded, "warnings": list(self.warnings)}


def _window_side(query: int, queries: int, height: int, width: int, start_fraction: float = 0.3
                 ) -> int:
    """Square's schedule: the window covers ``start_fraction`` of the slice at first and is
    halved in area at 10, 50, 200, 500, ... per 10 000 queries (rescaled to ``queries``)."""
    step = query * 10000 // max(queries, 1)
    halvings = sum(step > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    fraction = start_fraction / 2 ** halvings
    return max(1, min(height, width, int(round(math.sqrt(fraction * height * width)))))


@torch.no_grad()
def random_search(network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  norm: str, loss: Callable, queries: int, generator: torch.Generator
                  ) -> torch.Tensor:
    """Score-based attack: ``(B, C, H, W)`` points with ``||delta|| <= eps`` that raise ``loss``.

    Square-style random search (Andriushchenko et al., ECCV 2020) on the perturbation: each
    query redraws one square window (all channels) of every slice's perturbation at a random
    place, in L2 rescaling the whole perturbation back onto the sphere of radius ``eps``, in
    Linf as ``+-eps`` per channel; a slice keeps the proposal when its loss rises. Only the
    loss values are used, never a gradient.

    Args:
        x: ``(B, C, H, W)``; y: ``(B, 1, H, W)``; loss: ``(logits, y) -> (B,)``.
    """
    b, c, h, w = x.shape
    eps_t = torch.full((b,), float(eps), dtype=x.dtype, device=x.device)
    with attack_mode(network):
        if norm == "l2":
            delta = random_on_sphere(x, eps_t, "l2", generator)
        else:
            signs = torch.randint(0, 2, (b, c, 1, w), generator=generator).to(x) * 2 - 1
            delta = signs.expand(b, c, h, w) * eps
        best = loss(network(x + delta), y)
        for query in range(1, queries):
            side = _window_side(query, queries, h, w)
            top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            proposal = delta.clone()
            if norm == "l2":
                block = torch.randn((b, c, side, side), generator=generator).to(x)
                proposal[:, :, top:top + side, left:left + side] = block
                length = per_sample_norm(proposal, "l2").clamp_min(1e-12)
                proposal = proposal * per_sample_view(eps_t / length, proposal)
            else:
                signs = torch.randint(0, 2, (b, c, 1, 1), generator=generator).to(x) * 2 - 1
                proposal[:, :, top:top + side, left:left + side] = signs * eps
            value = loss(network(x + proposal), y)
            better = value > best
            delta = torch.where(per_sample_view(better, delta), proposal, delta)
            best = torch.where(better, value, best)
    return x + delta


def _tvdi_of(result: NoiseResult, rows: Optional[Sequence[int]] = None) -> float:
    tp, fp, fn = result.tp, result.fp, result.fn
    if rows is not None:
        tp, fp, fn = tp[list(rows)], fp[list(rows)], fn[list(rows)]
    return tvdi(torch.as_tensor(tp), torch.as_tensor(fp), torch.as_tensor(fn))[0]


def _attack_by_shape(model: LoadedModel, subset: Sequence[SliceSample], device: torch.device,
                     attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> NoiseResult:
    """The counts of ``subset`` after ``attack(x (B, C, H, W), y (B, 1, H, W)) -> x_adv``, run
    on one batch per slice shape (slices of several cases may differ in size)."""
    k = model.num_classes - 1
    tp, fp, fn = (np.zeros((len(subset), k), dtype=np.int64) for _ in range(3))
    shapes: Dict[tuple, List[int]] = {}
    for i, s in enumerate(subset):
        shapes.setdefault(s.image.shape, []).append(i)
    for idx in shapes.values():
        x = torch.from_numpy(np.stack([subset[i].image for i in idx])).to(device)
        labels = torch.from_numpy(np.stack([subset[i].label for i in idx]).astype(np.int64))
        x_adv = attack(x, labels[:, None].to(device))
        pred = segmentation(model, x_adv)
        for store, counts in zip((tp, fp, fn), scored_counts(pred, labels, model.num_classes,
                                                             model.ignore_label)):
            store[idx] = counts.numpy()
    return NoiseResult([s.case for s in subset], [s.index for s in subset], tp, fp, fn, {})


def _towards_background(logits: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``(B,)`` minus the mean CE towards label 0: maximised when every pixel is background."""
    return -F.cross_entropy(logits, background[:, 0], reduction="none").mean(dim=(1, 2))


def check_subset(samples: Sequence[SliceSample], count: int, seed: int) -> List[int]:
    """The rows of the slices the black-box and unbounded checks attack: a seeded draw of
    ``count`` (all when there are fewer), in their order."""
    if len(samples) <= count:
        return list(range(len(samples)))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(len(samples), size=count, replace=False))


def monotonicity_check(tvdi_by_noise: Dict[float, float]) -> dict:
    """Pairs of consecutive noise levels where TVDI rose by more than :data:`MONOTONE_POINTS`."""
    levels = sorted(tvdi_by_noise)
    rises = [{"from": lo, "to": hi, "tvdi_from": tvdi_by_noise[lo], "tvdi_to": tvdi_by_noise[hi]}
             for lo, hi in zip(levels, levels[1:])
             if 100 * (tvdi_by_noise[hi] - tvdi_by_noise[lo]) > MONOTONE_POINTS]
    return {"rises": rises, "fired": bool(rises)}


def unbounded_budget(samples: Sequence[SliceSample], norm: str) -> float:
    """The unbounded check's budget: RMS :data:`UNBOUNDED_RMS` per pixel of the largest slice
    in L2 (``UNBOUNDED_RMS * sqrt(C * H * W)``), :data:`UNBOUNDED_RMS` in Linf."""
    if norm == "linf":
        return UNBOUNDED_RMS
    return UNBOUNDED_RMS * math.sqrt(max(s.image.size for s in samples))


def run_masking_checks(model: LoadedModel, samples: List[SliceSample],
                       headline: Dict[float, NoiseResult], attack: AttackSettings,
                       settings: MaskingSettings, device: torch.device) -> MaskingReport:
    """The three checks of one model (see the module docstring).

    Args:
        samples: the run's slices, in the order of ``headline``'s rows.
        headline: the run's result per noise level (for an ensemble, its worst case).
        attack: the run's attack settings (norm, steps, alpha, seed).
    """
    report = MaskingReport()
    curve = {n: _tvdi_of(r) for n, r in headline.items()}
    report.monotonicity = monotonicity_check(curve)
    if report.monotonicity["fired"]:
        for rise in report.monotonicity["rises"]:
            report.warnings.append(
                f"{model.name}: TVDI rises from {100 * rise['tvdi_from']:.2f} % at noise "
                f"{rise['from']:g} to {100 * rise['tvdi_to']:.2f} % at noise {rise['to']:g}; "
                f"a stronger attack cannot do less harm, so the attack at the larger budget "
                f"failed (gradient masking or too few steps)")
    attacked = [n for n in sorted(headline) if n > 0]
    rows = check_subset(samples, settings.slices, attack.seed)
    subset = [samples[i] for i in rows]
    if attacked and subset:
        noise = attacked[-1]
        loss = attack_loss("dc_ce", model.ignore_label)
        generator = torch.Generator().manual_seed(attack.seed)
        black_box = _tvdi_of(_attack_by_shape(
            model, subset, device,
            lambda x, y: random_search(model.network, x, y, noise, attack.norm, loss,
                                       settings.queries, generator)))
        white_box = _tvdi_of(headline[noise], rows)
        points = 100 * (white_box - black_box)
        report.black_box = {"noise": noise, "slices": len(subset), "queries": settings.queries,
                            "tvdi_black_box": black_box, "tvdi_white_box": white_box,
                            "points": points, "fired": points > BLACK_BOX_POINTS}
        if report.black_box["fired"]:
            report.warnings.append(
                f"{model.name}: at noise {noise:g} a score-based random search ({settings.queries} "
                f"queries, no gradients) leaves TVDI {100 * black_box:.2f} %, {points:.2f} points "
                f"below the white-box attacks' {100 * white_box:.2f} % on the same "
                f"{len(subset)} slices: the gradients mislead the attacks (gradient masking); "
                f"trust neither number")
    if subset:
        eps = unbounded_budget(subset, attack.norm)

        def towards_background(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            background = torch.zeros_like(y)
            return run_pgd(model.network, x, background,
                           torch.full((len(x),), eps, dtype=x.dtype, device=x.device),
                           norm=attack.norm, steps=attack.steps, alpha=attack.alpha,
                           loss=_towards_background, random_start=False).x_adv
        value = _tvdi_of(_attack_by_shape(model, subset, device, towards_background))
        report.unbounded = {"eps": eps, "slices": len(subset), "tvdi": value,
                            "fired": value > UNBOUNDED_TVDI}
        if report.unbounded["fired"]:
            report.warnings.append(
                f"{model.name}: an unbounded attack (eps {eps:g}, {attack.steps} steps of PGD "
                f"towards background) leaves "
                f"TVDI {100 * value:.2f} % (expected under {100 * UNBOUNDED_TVDI:g} %): its "
                f"gradients do not lead anywhere (gradient masking or a broken attack)")
    return report
