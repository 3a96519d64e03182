"""Gradient-masking checks of a segmentation evaluation, run on a few samples (slices, or whole
cases of a 3D configuration) after the main run.

A robustness number from gradient attacks is only as good as the gradients. As AutoAttack and
RobustBench do for classifiers, three symptoms are checked, each against the headline result:

* **black box beats white box**: a score-based random search (Square-style: random square
  windows of a shrinking size, in 3D random boxes, accepted when the sample's loss rises; it
  never sees a gradient)
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

In 3D the search windows are boxes in the volume (not windows of the flattened volume: a box
keeps the spatial structure a convolutional network responds to), with the sides of the volume
scaled by one factor, so a box covers the same fraction of any volume, however anisotropic
(a cube would be capped by the thinnest axis of a volume of few slices). Volumes are searched
and attacked one at a time, as in the main run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
                                              batch_size_for, scored_counts)
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


def _window_fraction(query: int, queries: int, start_fraction: float = 0.3) -> float:
    """Square's schedule: the window covers ``start_fraction`` of the sample at first and is
    halved in area (volume) at 10, 50, 200, 500, ... per 10 000 queries (rescaled to
    ``queries``)."""
    step = query * 10000 // max(queries, 1)
    halvings = sum(step > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return start_fraction / 2 ** halvings


def _window_side(query: int, queries: int, height: int, width: int, start_fraction: float = 0.3
                 ) -> int:
    """The side of the square window of a ``height x width`` slice (:func:`_window_fraction`)."""
    fraction = _window_fraction(query, queries, start_fraction)
    return max(1, min(height, width, int(round(math.sqrt(fraction * height * width)))))


def window_sides(query: int, queries: int, size: Sequence[int]) -> Tuple[int, ...]:
    """The window of a sample of spatial ``size``: a square of :func:`_window_side` for a slice
    ``(H, W)``; for a volume ``(D, H, W)`` a box with every side ``size_i * f**(1/3)`` (at least
    1), ``f`` the fraction of :func:`_window_fraction`, so it covers about ``f`` of the volume."""
    if len(size) == 2:
        side = _window_side(query, queries, *size)
        return side, side
    scale = _window_fraction(query, queries) ** (1 / len(size))
    return tuple(max(1, min(n, int(round(n * scale)))) for n in size)


@torch.no_grad()
def random_search(network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  norm: str, loss: Callable, queries: int, generator: torch.Generator
                  ) -> torch.Tensor:
    """Score-based attack: ``(B, C, *spatial)`` points with ``||delta|| <= eps`` that raise
    ``loss``, for slices ``(H, W)`` or volumes ``(D, H, W)``.

    Square-style random search (Andriushchenko et al., ECCV 2020) on the perturbation: each
    query redraws one window (all channels; :func:`window_sides`) of every sample's
    perturbation at a random place, in L2 rescaling the whole perturbation back onto the sphere
    of radius ``eps``, in Linf as ``+-eps`` per channel; a sample keeps the proposal when its
    loss rises. Only the loss values are used, never a gradient. The Linf start is Square's
    vertical stripes (one sign per channel and position along the last axis).

    Args:
        x: ``(B, C, *spatial)``; y: ``(B, 1, *spatial)``; loss: ``(logits, y) -> (B,)``.
    """
    b, c, size = x.shape[0], x.shape[1], tuple(x.shape[2:])
    ones = (1,) * (len(size) - 1)
    eps_t = torch.full((b,), float(eps), dtype=x.dtype, device=x.device)
    with attack_mode(network):
        if norm == "l2":
            delta = random_on_sphere(x, eps_t, "l2", generator)
        else:
            signs = torch.randint(0, 2, (b, c, *ones, size[-1]), generator=generator).to(x) * 2 - 1
            delta = signs.expand(x.shape) * eps
        best = loss(network(x + delta), y)
        for query in range(1, queries):
            sides = window_sides(query, queries, size)
            # One corner per axis, drawn in axis order (top, then left, for a slice).
            corner = [int(torch.randint(0, n - s + 1, (1,), generator=generator))
                      for n, s in zip(size, sides)]
            window = (slice(None), slice(None),
                      *(slice(at, at + s) for at, s in zip(corner, sides)))
            proposal = delta.clone()
            if norm == "l2":
                block = torch.randn((b, c, *sides), generator=generator).to(x)
                proposal[window] = block
                length = per_sample_norm(proposal, "l2").clamp_min(1e-12)
                proposal = proposal * per_sample_view(eps_t / length, proposal)
            else:
                signs = torch.randint(0, 2, (b, c, *ones, 1), generator=generator).to(x) * 2 - 1
                proposal[window] = signs * eps
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
    """The counts of ``subset`` after ``attack(x (B, C, *spatial), y (B, 1, *spatial)) ->
    x_adv``, run on one batch per slice shape (slices of several cases may differ in size),
    one volume at a time in 3D."""
    k = model.num_classes - 1
    tp, fp, fn = (np.zeros((len(subset), k), dtype=np.int64) for _ in range(3))
    shapes: Dict[tuple, List[int]] = {}
    for i, s in enumerate(subset):
        shapes.setdefault(s.image.shape, []).append(i)
    size = batch_size_for(subset, len(subset))
    for idx in [idx[j:j + size] for idx in shapes.values() for j in range(0, len(idx), size)]:
        x = torch.from_numpy(np.stack([subset[i].image for i in idx])).to(device)
        labels = torch.from_numpy(np.stack([subset[i].label for i in idx]).astype(np.int64))
        x_adv = attack(x, labels[:, None].to(device))
        pred = segmentation(model, x_adv)
        for store, counts in zip((tp, fp, fn), scored_counts(pred, labels, model.num_classes,
                                                             model.ignore_label)):
            store[idx] = counts.numpy()
    return NoiseResult([s.case for s in subset], [s.index for s in subset], tp, fp, fn, {})


def _towards_background(logits: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``(B,)`` minus the mean CE towards label 0 over all spatial axes: maximised when every
    pixel (voxel) is background."""
    pixel = F.cross_entropy(logits, background[:, 0], reduction="none")
    return -pixel.mean(dim=tuple(range(1, pixel.dim())))


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
    """The unbounded check's budget: RMS :data:`UNBOUNDED_RMS` per pixel of the largest sample
    in L2 (``UNBOUNDED_RMS * sqrt(C * H * W)``, ``sqrt(C * D * H * W)`` for a volume),
    :data:`UNBOUNDED_RMS` in Linf."""
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
