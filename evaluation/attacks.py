"""The evaluator's attacks on 2D slices and 3D volumes: PGD, SegPGD, APGD (plain, at SEA's
shrinking radius, on SegPGD's loss), rse's PAdam and a minimal-perturbation attack, each from a
given start offset.

Shapes are written for slices, ``(B, C, H, W)``; a batch of volumes ``(B, C, D, H, W)`` works
the same way, every norm, projection, step size and loss taken per sample over all its axes (a
volume's budget is its own; the evaluator attacks one volume per batch).

All of them take per-sample budgets ``eps`` ``(B,)`` and a start offset ``start`` ``(B, C, H, W)``
with ``||start[i]|| <= eps[i]`` (``None``: start at ``x``). The caller draws the offset so that
one slice attacked at several noise levels in one batch starts exactly where it starts when each
level runs alone (one seeded generator per level, see ``robustness.py``) and hands it to the
core's PGD loop as its start (:func:`nnunet_ima.attacks.run_pgd`). Every quantity is per sample:
a slice's iterates do not depend on the other slices of the batch.

* ``pgd``: the core's loop, ``x_t = x + P(x_{t-1} + s * h(grad L(x_{t-1})) - x)``,
  ``s = alpha * eps / steps``, ``t = 1..steps``; ``h`` the unit-L2 gradient or its sign (Linf),
  ``P`` the projection onto the eps-ball (:mod:`nnunet_ima.norms`).
* ``segpgd``: the same loop with a loss schedule, SegPGD's loss (Gu et al., ECCV 2022,
  Eq. 4-5): at step ``t`` of ``T``,
  ``L = ((1 - lambda_t) * sum_{correct} CE_j + lambda_t * sum_{wrong} CE_k) / N`` with
  ``lambda_t = (t - 1) / (2 T)`` (0 at the first step, ``(T - 1) / (2T) < 1/2`` at the last),
  "correct" judged on the prediction of the current iterate ``x_{t-1}``, and ``N`` the pixels
  of the slice that are scored (the paper's ``H x W``; ignore-label pixels excluded).
* ``apgd``: Auto-PGD's step-size schedule (Croce and Hein, ICML 2020, Algorithm 1) per slice:
  first step size ``2 eps``, momentum ``x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k -
  x_{k-1}))`` with ``a = 0.75`` and ``z_{k+1} = P(x_k + eta_k h(grad))``; at the checkpoints
  ``w_j = ceil(p_j steps)`` (``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} -
  0.03, 0.06)``) a slice halves its step size and restarts from its best iterate when fewer than
  ``rho = 0.75`` of the steps since the previous checkpoint increased its loss, or when its step
  size was not halved at the previous checkpoint and its best loss has not changed since. It
  returns each slice's best (highest-loss) iterate.
* ``apgd_lowest``: ``apgd``'s iterates, returning each slice's lowest-Dice iterate instead of
  its highest-loss one, as rse's APGD keeps its lowest-accuracy iterate.
* ``apgd_sea``: APGD as SEA runs it for segmentation (Croce, Singh and Hein, ECCV 2024): three
  stages at radii ``2 eps``, ``1.5 eps``, ``eps`` (30 / 30 / 40 % of the steps), each started
  from the previous stage's lowest-Dice iterate, returning the last stage's lowest-Dice iterate
  (:func:`apgd_shrinking_radius`); meant for SEA's losses (:mod:`.segmentation_losses`).
* ``apgd_segpgd``: APGD on SegPGD's loss with ``lambda_k = k / (2 steps)`` at iterate ``k = 0..
  steps`` (rse's "segpgd-loss" APGD; :func:`apgd_segpgd`), through APGD's ``loss_schedule``.
* ``padam``: rse's PAdam (Halmosi, Mohos and Jelasity, ECCV 2024): Adam with AMSGrad maximising
  the loss over the offset, ``lr = eps / 4`` (Linf; ``eps / (4 sqrt(n))`` in L2), the offset
  projected onto the ball after each step, the last iterate (:func:`padam`).
* ``minimal``: :func:`minimal_perturbation` run unbounded with success ``Dice <``
  :data:`MINIMAL_MEMBER_THRESHOLD` and its result projected onto the ``eps``-ball, as rse runs
  DAG, PDPGD and ALMA-prox (:func:`minimal_member`).

Minimal perturbations (:func:`minimal_perturbation`, per slice the smallest noise whose Dice falls
below a threshold) follow FMN (Pintor et al., NeurIPS 2021), itself DDN's radius rule (Rony et
al., CVPR 2019) made norm-generic: a per-slice radius ``eps_k`` grows by ``(1 + gamma_k)`` while
the iterate is not adversarial and shrinks to ``(1 - gamma_k) min(eps_k, ||delta_k||)`` once it
is; the iterate ascends the loss by ``alpha_k eps_k h(grad)`` and is projected onto the radius'
ball; ``gamma_k`` and ``alpha_k`` are cosine annealed and the smallest-norm adversarial iterate is
kept. Adapted to segmentation by the criterion (the slice Dice below a threshold instead of a
wrong class) and by steps relative to the radius (nnU-Net's inputs are z-scores, not ``[0, 1]``).
Chosen over ALMA-prox (rse's strongest minimal attack): ALMA-prox is an augmented Lagrangian
with a penalty per pixel, a penalty growth rate, a multiplier step and a constraint threshold to
tune, and a proximal step per iteration; FMN has no penalty parameter, takes one gradient per
step, and works the same in L2 and Linf. On a linear model it reaches the analytic margin to
within ``gamma``'s last value, from above (tests/test_minimal_perturbation.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.attacks import run_pgd, start_point
from nnunet_ima.label_mask import label_map, scored_labels, scored_mean
from nnunet_ima.model_mode import attack_mode
from nnunet_ima.norms import (as_eps_tensor, check_norm, per_sample_norm, per_sample_view,
                              project, steepest_ascent_direction)

ATTACKS = ("pgd", "segpgd", "apgd", "apgd_sea", "padam", "apgd_segpgd", "minimal",
           "apgd_lowest")

APGD_MOMENTUM = 0.75  # the paper's alpha: weight of the new step, 1 - 0.75 on the previous one
APGD_RHO = 0.75  # checkpoint rule; the classification evaluator passes it to torchattacks' APGD
APGD_FIRST_STEP = 2.0  # eta_0 = 2 eps (Algorithm 1, both norms)

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss(logits (B, K, H, W), target (B, 1, H, W)) -> (B,)``, maximised by the attack."""
ScoreFn = Callable[[torch.Tensor, Any], torch.Tensor]
"""``score(logits (B, K, H, W), target) -> (B,)``, what the attack wants low (the slice Dice)."""


# ----------------------------------------------------------------------------- PGD and SegPGD

def segpgd_lambda(t: int, steps: int) -> float:
    """SegPGD's weight of the wrongly classified pixels at step ``t`` of ``steps`` (1-based):
    ``(t - 1) / (2 * steps)``, rising linearly from 0 to just below 1/2 (Gu et al., Eq. 5)."""
    if not 1 <= t <= steps:
        raise ValueError(f"t must be in [1, {steps}], got {t}")
    return (t - 1) / (2 * steps)


def segpgd_loss(logits: torch.Tensor, target: torch.Tensor, lam: float,
                ignore_label: Optional[int] = None) -> torch.Tensor:
    """SegPGD's loss per slice (Gu et al., Eq. 4).

    ``((1 - lam) * sum of the CE of correctly classified pixels + lam * sum of the CE of wrongly
    classified pixels) / number of scored pixels``. Pixels with ``ignore_label`` count in
    neither sum nor in the count; nnU-Net's ``-1`` outside the cropped region is background
    (:mod:`nnunet_ima.label_mask`). Which pixels are correct is read off ``logits`` (argmax),
    not differentiated.

    Args:
        logits: ``(B, K, H, W)``; target: ``(B, 1, H, W)`` or ``(B, H, W)`` integer labels.

    Returns:
        ``(B,)``.
    """
    safe, valid = scored_labels(label_map(target, logits), ignore_label)
    pixel_ce = F.cross_entropy(logits, safe, reduction="none")
    with torch.no_grad():
        correct = logits.argmax(dim=1) == safe
        # The weights in the loss' own precision: python floats would make them float32.
        weight = torch.where(correct, pixel_ce.new_tensor(1.0 - lam), pixel_ce.new_tensor(lam))
    return scored_mean(pixel_ce * weight, valid)


def segpgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
           start: Optional[torch.Tensor], *, norm: str, steps: int, alpha: float,
           ignore_label: Optional[int] = None) -> torch.Tensor:
    """SegPGD: the core's PGD loop (:func:`nnunet_ima.attacks.run_pgd`) from ``x + start`` on
    :func:`segpgd_loss` with ``lambda_t`` of step ``t``.

    Args:
        x: ``(B, C, H, W)`` clean slices; y: ``(B, 1, H, W)`` label maps.
        eps: ``(B,)`` budgets; start: ``(B, C, H, W)`` offset inside the ball, or ``None``.

    Returns:
        ``(B, C, H, W)`` the last iterate.
    """
    def loss_at(t: int) -> LossFn:
        lam = segpgd_lambda(t, steps)
        return lambda logits, target: segpgd_loss(logits, target, lam, ignore_label)
    return run_pgd(model, x, y, eps, norm=norm, steps=steps, alpha=alpha, random_start=False,
                   start=start, loss_schedule=loss_at).x_adv


# ----------------------------------------------------------------------------- APGD

def apgd_checkpoints(steps: int) -> List[int]:
    """The iterates ``w_j = ceil(p_j * steps)`` (``w_0 = 0`` excluded) at which APGD checks its
    progress: ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` while
    ``p_j <= 1``. For 100 steps: 22, 41, 57, 70, 80, 87, 93, 99."""
    # p in hundredths keeps the arithmetic exact (0.41 * 100 is 41.00000000000001 in floats).
    previous, current, points = 0, 22, []
    while current <= 100:
        w = -(-current * steps // 100)
        if w > 0 and (not points or w > points[-1]):
            points.append(w)
        previous, current = current, current + max(current - previous - 3, 6)
    return points


@dataclass
class APGDRun:
    """The outcome of :func:`apgd`.

    Attributes:
        x_best: ``(B, C, H, W)`` each slice's highest-loss iterate (the start included).
        loss_best, loss_start: ``(B,)`` the loss at ``x_best`` and at the start point.
        step_size: ``(B,)`` each slice's final step size (``2 eps / 2**halvings``).
        x_lowest_score, score_lowest: with a ``score``, each slice's iterate of the lowest
            score (the start included) and that score, ``(B, C, H, W)`` and ``(B,)``; else
            ``None``.
    """

    x_best: torch.Tensor
    loss_best: torch.Tensor
    loss_start: torch.Tensor
    step_size: torch.Tensor
    x_lowest_score: Optional[torch.Tensor] = None
    score_lowest: Optional[torch.Tensor] = None


def apgd(model: nn.Module, x: torch.Tensor, y: Any, eps: torch.Tensor,
         start: Optional[torch.Tensor], *, norm: str, steps: int, loss: LossFn,
         rho: float = APGD_RHO, momentum: float = APGD_MOMENTUM,
         score: Optional[ScoreFn] = None,
         loss_schedule: Optional[Callable[[int], LossFn]] = None) -> APGDRun:
    """Auto-PGD maximising ``loss`` per slice (see the module docstring for the schedule).

    ``steps`` gradient steps: the loss is evaluated at the start and at each of the ``steps``
    iterates, the gradient at all but the last, as many passes as PGD's ``steps`` plus its final
    prediction. Slices keep their own step size, checkpoint statistics and best point.

    Args:
        x: ``(B, ...)`` clean input; y: labels with a batch dimension; eps: ``(B,)`` budgets.
        start: ``(B, ...)`` offset inside the ball, or ``None``.
        loss: ``(output, y) -> (B,)``.
        score: ``(output, y) -> (B,)``, lower is a better attack (e.g. the slice Dice); when
            given, each slice's lowest-score iterate is kept too. SEA's masked losses need it:
            their value falls as pixels flip, so the highest-loss iterate is not the one that
            broke the most.
        loss_schedule: ``k -> loss`` of iterate ``k = 0..steps`` (0 the start), where the
            objective changes along the way (SegPGD's weights, :func:`apgd_segpgd`); replaces
            ``loss``. An iterate's value and gradient both come from its own ``k``'s loss.

    Returns:
        :class:`APGDRun`.
    """
    norm = check_norm(norm)
    x = x.detach()
    eps = as_eps_tensor(eps, x)
    checkpoints = set(apgd_checkpoints(steps))

    def ball(v: torch.Tensor) -> torch.Tensor:
        return x + project(v - x, eps, norm)

    x_low = s_low = None

    def evaluate(point: torch.Tensor, with_grad: bool, k: int):
        nonlocal x_low, s_low
        loss_k = loss if loss_schedule is None else loss_schedule(k)
        if not with_grad:
            with torch.no_grad():
                output = model(point)
                value, grad = loss_k(output, y).detach(), None
        else:
            point = point.clone().requires_grad_(True)
            output = model(point)
            value = loss_k(output, y)
            (grad,) = torch.autograd.grad(value.sum(), point)
            value, point = value.detach(), point.detach()
        if score is not None:
            with torch.no_grad():
                s_point = score(output.detach(), y)
            if x_low is None:
                x_low, s_low = point.clone(), s_point
            else:
                lower = s_point < s_low
                x_low[lower] = point[lower]
                s_low = torch.where(lower, s_point, s_low)
        return value, grad

    with attack_mode(model):
        x_k = start_point(x, start)
        f_k, g_k = evaluate(x_k, steps > 0, 0)
        x_prev = x_k
        eta = APGD_FIRST_STEP * eps
        x_best, f_best, g_best = x_k.clone(), f_k.clone(), g_k
        f_start = f_k.clone()
        # Checkpoint statistics, per slice.
        increases = torch.zeros_like(f_k, dtype=torch.long)
        last_checkpoint = 0
        f_best_at_checkpoint = f_best.clone()
        halved_at_checkpoint = torch.zeros_like(f_k, dtype=torch.bool)
        for k in range(steps):
            z = ball(x_k + per_sample_view(eta, x) * steepest_ascent_direction(g_k, norm))
            if k == 0:
                x_new = z
            else:
                x_new = ball(x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - x_prev))
            f_new, g_new = evaluate(x_new, k + 1 < steps, k + 1)
            increases += (f_new > f_k).long()
            better = f_new > f_best
            x_best[better] = x_new[better]
            f_best = torch.where(better, f_new, f_best)
            if g_new is not None:
                g_best = torch.where(per_sample_view(better, x), g_new, g_best)
            x_prev, x_k, f_k, g_k = x_k, x_new, f_new, g_new
            if k + 1 in checkpoints:
                since = k + 1 - last_checkpoint
                few_increases = increases < rho * since
                stalled = ~halved_at_checkpoint & (f_best == f_best_at_checkpoint)
                halve = few_increases | stalled
                eta = torch.where(halve, eta / 2, eta)
                # Restart from the best point (its gradient was kept with it).
                x_k = torch.where(per_sample_view(halve, x), x_best, x_k)
                f_k = torch.where(halve, f_best, f_k)
                if g_k is not None:
                    g_k = torch.where(per_sample_view(halve, x), g_best, g_k)
                increases.zero_()
                last_checkpoint = k + 1
                f_best_at_checkpoint = f_best.clone()
                halved_at_checkpoint = halve
    return APGDRun(x_best.detach(), f_best, f_start, eta, x_low, s_low)


SEA_RADIUS_STAGES = ((0.3, 2.0), (0.3, 1.5), (0.4, 1.0))
"""SEA's shrinking budget: (share of the steps, radius / eps) of each APGD stage."""


def apgd_shrinking_radius(model: nn.Module, x: torch.Tensor, y: Any, eps: torch.Tensor,
                          start: Optional[torch.Tensor], *, norm: str, steps: int, loss: LossFn,
                          score: ScoreFn,
                          stages: Sequence[Tuple[float, float]] = SEA_RADIUS_STAGES
                          ) -> torch.Tensor:
    """APGD at a shrinking radius, as SEA runs it (Croce, Singh and Hein, ECCV 2024): 30 % of
    the steps at ``2 eps``, 30 % at ``1.5 eps``, the rest at ``eps``. Each stage starts from the
    previous stage's lowest-``score`` iterate projected into its own ball; a larger ball first
    lets the iterate leave the flat region around ``x`` that masked losses start in.

    Shapes as in :func:`apgd`; returns ``(B, C, H, W)``, the final stage's lowest-score iterate,
    inside the ``eps``-ball.
    """
    norm = check_norm(norm)
    x = x.detach()
    eps = as_eps_tensor(eps, x)
    counts = [int(share * steps) for share, _ in stages[:-1]]
    counts.append(steps - sum(counts))
    offset = start
    point = None
    for count, (_, factor) in zip(counts, stages):
        radius = eps * factor
        if point is not None:
            offset = project(point - x, radius, norm)
        run = apgd(model, x, y, radius, offset, norm=norm, steps=count, loss=loss, score=score)
        point = run.x_lowest_score
    return point


def apgd_segpgd_lambda(k: int, steps: int) -> float:
    """SegPGD's weight of the wrongly classified pixels at APGD's iterate ``k`` of ``steps``
    (``k = 0`` the start): ``k / (2 * steps)``, from 0 to 1/2 (rse's "segpgd-loss" APGD, and the
    ``cospgd`` package's ``segpgd_scale`` with its 0-based iteration)."""
    if not 0 <= k <= steps:
        raise ValueError(f"k must be in [0, {steps}], got {k}")
    return k / (2 * steps) if steps else 0.0


def apgd_segpgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                start: Optional[torch.Tensor], *, norm: str, steps: int,
                ignore_label: Optional[int] = None, score: Optional[ScoreFn] = None) -> APGDRun:
    """APGD (:func:`apgd`) on SegPGD's loss (:func:`segpgd_loss`) with ``lambda_k =``
    :func:`apgd_segpgd_lambda` at iterate ``k``. Shapes as in :func:`apgd`."""
    def loss_at(k: int) -> LossFn:
        lam = apgd_segpgd_lambda(k, steps)
        return lambda logits, target: segpgd_loss(logits, target, lam, ignore_label)
    return apgd(model, x, y, eps, start, norm=norm, steps=steps, loss=loss_at(0), score=score,
                loss_schedule=loss_at)


# ----------------------------------------------------------------------------- PAdam

PADAM_LR = 0.25
"""PAdam's learning rate over the budget: rse runs ``lr = 2/255`` at ``eps = 8/255`` in Linf."""
PADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which rse keeps
PADAM_EPSILON = 1e-8


def padam_learning_rate(eps: torch.Tensor, norm: str, numel: int) -> torch.Tensor:
    """``(B,)`` PAdam's learning rate: ``eps / 4`` in Linf; ``eps / (4 sqrt(n))`` in L2 (``n``
    elements per sample), so that a step of Adam, whose update is about ``lr`` in every
    coordinate, is about ``eps / 4`` long in L2 as it is in Linf."""
    norm = check_norm(norm)
    rate = PADAM_LR * eps
    return rate if norm == "linf" else rate / math.sqrt(numel)


def padam(model: nn.Module, x: torch.Tensor, y: Any, eps: torch.Tensor,
          start: Optional[torch.Tensor], *, norm: str, steps: int, loss: LossFn) -> torch.Tensor:
    """rse's PAdam (Halmosi, Mohos and Jelasity, ECCV 2024): Adam with AMSGrad maximising
    ``loss`` over the offset ``delta`` (from ``start``, or 0), ``delta`` projected onto the
    ``eps``-ball after every step; the last iterate. No step size to tune: Adam's update is about
    ``lr`` (:func:`padam_learning_rate`) per coordinate whatever the gradient's scale.

    Each slice is its own parameter group of ``torch.optim.Adam`` (its own ``lr``, from its own
    ``eps``) and the gradient is that of the sum of the per-slice losses, so a slice's iterates
    do not depend on the batch (rse differentiates a batch mean: the same iterates up to Adam's
    ``1e-8``).

    Args:
        x: ``(B, C, H, W)`` clean slices; y: ``(B, 1, H, W)`` labels; eps: ``(B,)`` budgets.
        start: ``(B, C, H, W)`` offset inside the ball, or ``None``.
        loss: ``(logits, y) -> (B,)``, maximised.

    Returns:
        ``(B, C, H, W)`` the last iterate, inside the ball.
    """
    norm = check_norm(norm)
    x = x.detach()
    eps = as_eps_tensor(eps, x)
    lr = padam_learning_rate(eps, norm, x[0].numel())
    offset = start_point(x, start) - x
    deltas = [offset[i].clone().requires_grad_(True) for i in range(x.shape[0])]
    optimizer = torch.optim.Adam([{"params": [d], "lr": float(r)} for d, r in zip(deltas, lr)],
                                 betas=PADAM_BETAS, eps=PADAM_EPSILON, amsgrad=True,
                                 maximize=True)
    with attack_mode(model):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss(model(x + torch.stack(deltas)), y).sum().backward()
            optimizer.step()
            with torch.no_grad():
                projected = project(torch.stack(deltas), eps, norm)
                for d, p in zip(deltas, projected):
                    d.copy_(p)
    return (x + torch.stack(deltas)).detach()


# ----------------------------------------------------------------------------- minimal noise

MINIMAL_MEMBER_THRESHOLD = 0.01
"""The ``minimal`` member's success: slice Dice below 0.01 (ALMA-prox's 99 % of pixels wrong)."""
MINIMAL_GAMMA = (0.1, 0.001)
"""The radius' relative change per step, at the first and the last step (cosine annealed)."""
MINIMAL_ALPHA = (1.0, 0.01)
"""The step over the current radius, at the first and the last step (cosine annealed)."""


def cosine_annealed(k: int, steps: int, first: float, last: float) -> float:
    """``last + (first - last) (1 + cos(pi k / steps)) / 2``: ``first`` at ``k = 0``, falling to
    ``last`` at ``k = steps``."""
    return last + (first - last) * (1 + math.cos(math.pi * k / max(steps, 1))) / 2


@dataclass
class MinimalRun:
    """The outcome of :func:`minimal_perturbation`.

    Attributes:
        x_adv: ``(B, ...)`` each sample's smallest-norm iterate with ``score < threshold``, or its
            last iterate where none was found.
        norm: ``(B,)`` the norm of ``x_adv - x`` where found, ``inf`` elsewhere; 0 where the
            clean input already scores below the threshold.
        found: ``(B,)`` bool, whether an iterate scored below the threshold.
    """

    x_adv: torch.Tensor
    norm: torch.Tensor
    found: torch.Tensor


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """:func:`~nnunet_ima.norms.steepest_ascent_direction` that survives tiny gradients: the L2
    gradient is scaled by its largest entry before it is normalised, so a saturated loss (CE on
    a confident slice far from its boundary, gradients below 1e-12) still points somewhere."""
    if norm == "linf":
        return grad.sign()
    peak = grad.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
    return steepest_ascent_direction(grad / per_sample_view(peak, grad), norm)


def minimal_perturbation(model: nn.Module, x: torch.Tensor, y: Any, *, norm: str, steps: int,
                         score: ScoreFn, threshold: float, loss: LossFn,
                         init_eps: Union[float, torch.Tensor],
                         max_eps: Optional[Union[float, torch.Tensor]] = None,
                         start: Optional[torch.Tensor] = None,
                         gamma: Tuple[float, float] = MINIMAL_GAMMA,
                         alpha: Tuple[float, float] = MINIMAL_ALPHA) -> MinimalRun:
    """Each sample's smallest perturbation with ``score < threshold`` (FMN-style, see the module
    docstring), every quantity per sample.

    At step ``k = 0..steps-1`` the iterate ``x_k`` (``x + start``, or ``x``, at ``k = 0``) is
    scored; the radius becomes ``(1 - gamma_k) min(eps, ||x_k - x||)`` when ``x_k`` scores below
    ``threshold``, ``(1 + gamma_k) eps`` otherwise (at most ``max_eps``); then
    ``x_{k+1} = x + P_eps(x_k + alpha_k eps h(grad loss(x_k)) - x)``. ``gamma_k`` and ``alpha_k``
    are cosine annealed (:func:`cosine_annealed`, :data:`MINIMAL_GAMMA`, :data:`MINIMAL_ALPHA`).
    ``steps`` gradients, ``steps + 1`` forward passes (one more for the clean input when
    ``start`` is given).

    Args:
        x: ``(B, C, H, W)`` clean slices; y: ``(B, 1, H, W)`` labels.
        norm: ``"l2"`` or ``"linf"``; steps: gradient steps.
        score: ``(logits, y) -> (B,)`` (the slice Dice); threshold: success is ``score <
            threshold``.
        loss: ``(logits, y) -> (B,)``, maximised to drive the score down.
        init_eps: ``(B,)`` or scalar first radius, ``> 0``; max_eps: cap of the radius, or
            ``None``. start: ``(B, C, H, W)`` first offset, or ``None``.

    Returns:
        :class:`MinimalRun`.
    """
    norm = check_norm(norm)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    x = x.detach()
    radius = as_eps_tensor(init_eps, x, "init_eps").clone()
    if (radius <= 0).any():
        raise ValueError("init_eps must be > 0 for every sample: the radius grows by a factor "
                         "and would stay at 0; pass the smallest noise level of interest")
    cap = None if max_eps is None else as_eps_tensor(max_eps, x, "max_eps")
    if cap is not None:
        radius = torch.minimum(radius, cap)
    best = x.clone()
    best_norm = torch.full_like(radius, math.inf)

    def record(point: torch.Tensor, scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        nonlocal best_norm
        size = per_sample_norm(point - x, norm)
        adversarial = scores.to(x.device) < threshold
        smaller = adversarial & (size < best_norm)
        best[smaller] = point[smaller]
        best_norm = torch.where(smaller, size, best_norm)
        return adversarial, size

    with attack_mode(model):
        if start is not None:
            with torch.no_grad():
                record(x, score(model(x), y))
        point = start_point(x, start)
        for k in range(steps + 1):
            last = k == steps
            current = point.clone().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                output = model(current)
            with torch.no_grad():
                adversarial, size = record(point, score(output.detach(), y))
            if last:
                break
            (grad,) = torch.autograd.grad(loss(output, y).sum(), current)
            g = cosine_annealed(k, steps, *gamma)
            a = cosine_annealed(k, steps, *alpha)
            radius = torch.where(adversarial, (1 - g) * torch.minimum(radius, size),
                                 (1 + g) * radius)
            if cap is not None:
                radius = torch.minimum(radius, cap)
            stepped = point + per_sample_view(a * radius, x) * _ascent_direction(grad, norm)
            point = x + project(stepped - x, radius, norm)
    found = torch.isfinite(best_norm)
    x_adv = torch.where(per_sample_view(found, x), best, point)
    return MinimalRun(x_adv.detach(), best_norm, found)


def minimal_member(model: nn.Module, x: torch.Tensor, y: Any, eps: torch.Tensor,
                   start: Optional[torch.Tensor], *, norm: str, steps: int, loss: LossFn,
                   score: ScoreFn) -> torch.Tensor:
    """The ``minimal`` member: :func:`minimal_perturbation` (success: ``score <``
    :data:`MINIMAL_MEMBER_THRESHOLD`), unbounded, from the radius ``eps``, its result projected
    onto the ``eps``-ball (rse's convention for minimal attacks). ``(B, C, H, W)``."""
    norm = check_norm(norm)
    x = x.detach()
    eps = as_eps_tensor(eps, x)
    # A zero budget projects everything to x; any positive first radius will do there.
    first = torch.where(eps > 0, eps, torch.ones_like(eps))
    run = minimal_perturbation(model, x, y, norm=norm, steps=steps, score=score,
                               threshold=MINIMAL_MEMBER_THRESHOLD, loss=loss, init_eps=first,
                               start=start)
    return x + project(run.x_adv - x, eps, norm)


# ----------------------------------------------------------------------------- dispatch

def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
               start: Optional[torch.Tensor], *, norm: str, steps: int, alpha: float,
               loss: LossFn, ignore_label: Optional[int] = None,
               score: Optional[ScoreFn] = None) -> torch.Tensor:
    """The adversarial slices ``(B, C, H, W)`` of attack ``name`` (one of :data:`ATTACKS`),
    inside the ``eps``-ball.

    ``alpha`` applies to ``pgd`` and ``segpgd`` only (APGD's step size adapts, starting at
    ``2 eps``; PAdam's is ``eps / 4``; ``minimal`` anneals its own); ``loss`` does not apply to
    ``segpgd`` and ``apgd_segpgd`` (they maximise SegPGD's weighted CE); ``ignore_label`` is
    SegPGD's (``loss`` carries its own). ``apgd_sea`` is :func:`apgd_shrinking_radius` and
    needs ``score``; ``apgd_segpgd`` returns the lowest-``score`` iterate when ``score`` is
    given (rse keeps the lowest-accuracy one: the loss changes with ``k``, so its highest value
    is no better a pick), otherwise the highest-loss one; ``apgd_lowest`` is :func:`apgd`
    returning each slice's lowest-``score`` iterate (rse's APGD) and needs ``score``; ``padam`` is :func:`padam`; ``minimal`` is :func:`minimal_member` and needs ``score``.
    """
    if name == "pgd":
        return run_pgd(model, x, y, eps, norm=norm, steps=steps, alpha=alpha, loss=loss,
                       random_start=False, start=start).x_adv
    if name == "segpgd":
        return segpgd(model, x, y, eps, start, norm=norm, steps=steps, alpha=alpha,
                      ignore_label=ignore_label)
    if name == "apgd":
        return apgd(model, x, y, eps, start, norm=norm, steps=steps, loss=loss).x_best
    if name == "apgd_lowest":
        # rse's APGD: the same iterates, returning each slice's lowest-score one (rse keeps the
        # lowest pixel accuracy; the evaluator's score is the slice Dice it reports).
        if score is None:
            raise ValueError("apgd_lowest needs a score (the slice Dice) to pick its iterate")
        return apgd(model, x, y, eps, start, norm=norm, steps=steps, loss=loss,
                    score=score).x_lowest_score
    if name == "apgd_sea":
        if score is None:
            raise ValueError("apgd_sea needs a score (the slice Dice) to pick its iterates")
        return apgd_shrinking_radius(model, x, y, eps, start, norm=norm, steps=steps, loss=loss,
                                     score=score)
    if name == "padam":
        return padam(model, x, y, eps, start, norm=norm, steps=steps, loss=loss)
    if name == "apgd_segpgd":
        run = apgd_segpgd(model, x, y, eps, start, norm=norm, steps=steps,
                          ignore_label=ignore_label, score=score)
        return run.x_best if score is None else run.x_lowest_score
    if name == "minimal":
        if score is None:
            raise ValueError("minimal needs a score (the slice Dice): it is its success criterion")
        return minimal_member(model, x, y, eps, start, norm=norm, steps=steps, loss=loss,
                              score=score)
    raise ValueError(f"attack must be one of {ATTACKS}, got {name!r}")
