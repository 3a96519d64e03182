"""The adversarial-training methods IMA is compared with: TRADES, MMA, DDN, FAT and GAIRAT.

Each function computes one batch's training loss, following the method's own paper, at the
budget the comparison gives every method (``config.eps``: the IMA paper's ``eps_max`` of the
dataset unless set). All inner attacks are the core PGD (``nnunet_ima.attacks``, the training
norm, ``config.attack.steps`` steps of ``config.attack.alpha * eps / steps``, random start)
unless the method prescribes another one (DDN). Where a paper is vague, the choice is in the
docstring.

Shapes: ``x (B, ...)`` inputs, ``y (B,)`` labels; every function returns ``(loss, stats)`` with
a scalar loss and per-batch counts for the epoch's history row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.adversarial_step import kl_to_reference
from nnunet_ima.attacks import argmax_correct, bpgd, run_pgd
from nnunet_ima.classification.ddn import ddn
from nnunet_ima.classification.settings import TrainConfig

Stats = Dict[str, float]


@dataclass
class BatchContext:
    """What a baseline needs besides the batch: the model, the settings and where training is."""

    model: nn.Module
    config: TrainConfig
    epoch: int                      # 0-based epoch being trained
    clamp: Optional[Tuple[float, float]]
    generator: torch.Generator      # random starts of this epoch's attacks

    def pgd_kwargs(self) -> dict:
        attack = self.config.attack
        return {"norm": attack.norm, "steps": attack.steps, "alpha": attack.alpha,
                "clamp": self.clamp, "generator": self.generator}


def _wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) != y).sum())


# ------------------------------------------------------------------------------------ TRADES
def trades(ctx: BatchContext, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """TRADES (Zhang et al., ICML 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))``.

    ``x'`` maximises the KL divergence to the clean prediction inside the ``eps`` ball (PGD on
    the KL, the network in eval mode as in the TRADES code). ``beta`` = ``config.trades_beta``
    (6, the paper's CIFAR-10 value). The TRADES code starts its PGD at ``x + 0.001 N(0, I)``; the
    core PGD's random start (uniform radius in the ball) is used instead, which also gives the KL
    a non-zero gradient at the first step.
    """
    model, c = ctx.model, ctx.config
    with torch.no_grad():
        was_training = model.training
        model.eval()
        p_clean = F.softmax(model(x), dim=1)
        model.train(was_training)

    x_adv = run_pgd(model, x, p_clean, c.eps, loss=kl_to_reference, **ctx.pgd_kwargs()).x_adv
    logits = model(x)
    logits_adv = model(x_adv)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1),
                      reduction="batchmean")
    loss = F.cross_entropy(logits, y) + c.trades_beta * robust
    return loss, {"adv_wrong": float((logits_adv.argmax(1) != y).sum())}


# --------------------------------------------------------------------------------------- MMA
def mma(ctx: BatchContext, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """MMA (Ding et al., ICLR 2020): max-margin training at the shortest successful perturbation.

    For each correctly classified sample the margin is estimated by adaptive-norm PGD: PGD on
    the margin loss from the clean input at ``d_max`` (= ``config.eps``) that stops at the first
    misclassified iterate, then bisection between it and the iterate before (the core BPGD, here
    at the fixed ``d_max`` rather than at IMA's per-sample margins, and without a random start,
    which would lengthen the path to the boundary and overestimate the margin). The MMA loss is the cross-entropy at the
    boundary point of every correct sample whose margin is below ``d_max`` (the hinge: samples
    already robust at ``d_max`` add nothing) plus the clean cross-entropy of every misclassified
    sample, summed and divided by ``B``; as in the MMA code the total mixes in the clean loss of
    the whole batch with weight ``config.mma_clean_weight`` (1/3):
    ``L = w * CE(x) + (1 - w) * L_MMA``.
    """
    model, c = ctx.model, ctx.config
    logits = model(x)
    clean_loss = F.cross_entropy(logits, y, reduction="none")
    correct = argmax_correct(logits.detach(), y)
    terms = [clean_loss[~correct]]
    idx = correct.nonzero().flatten()
    crossed, margin_sum = 0, 0.0
    if idx.numel():
        result = bpgd(model, x[idx], y[idx], c.eps, argmax_correct, loss="margin",
                      binary_steps=c.mma_binary_steps, random_start=False, **ctx.pgd_kwargs())
        found = result.found
        crossed = int(found.sum())
        if crossed:
            margin_sum = float(result.distance[found].sum())
            terms.append(F.cross_entropy(model(result.x_boundary[found]), y[idx[found]],
                                         reduction="none"))
    mma_loss = torch.cat(terms).sum() / len(y)
    loss = c.mma_clean_weight * clean_loss.mean() + (1 - c.mma_clean_weight) * mma_loss
    return loss, {"crossed": float(crossed), "margin_sum": margin_sum}


# --------------------------------------------------------------------------------------- DDN
def ddn_training(ctx: BatchContext, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """DDN adversarial training (Rony et al., CVPR 2019): cross-entropy on DDN examples.

    The DDN attack (``config.ddn_steps`` iterations, 100 as in the paper, ``gamma``
    ``config.ddn_gamma``) with ``max_norm = config.eps``; the model is trained on the
    adversarial examples only, as in the DDN paper's training. L2 only.
    """
    model, c = ctx.model, ctx.config
    x_adv, found = ddn(model, x, y, c.eps, steps=c.ddn_steps, gamma=c.ddn_gamma, clamp=ctx.clamp)
    logits_adv = model(x_adv)
    return F.cross_entropy(logits_adv, y), {"adv_wrong": float((logits_adv.argmax(1) != y).sum()),
                                            "found": float(found.sum())}


# --------------------------------------------------------------------------------------- FAT
def fat_tau(epoch: int, epochs: int) -> int:
    """FAT's dynamic tau: 0, then 1 after 50/120 of the epochs, 2 after 90/120 (FAT's schedule
    for 120 epochs, scaled to the run's length)."""
    progress = (epoch + 1) / epochs
    return 0 if progress <= 50 / 120 else 1 if progress <= 90 / 120 else 2


def fat(ctx: BatchContext, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """FAT (Zhang et al., ICML 2020): training on friendly adversarial data from PGD-K-tau.

    PGD-K-tau stops a sample's iterations once it has been misclassified ``tau + 1`` times: the
    first misclassified iterate when ``tau = 0``, ``tau`` further steps otherwise ("early
    stopped PGD"). ``tau`` follows :func:`fat_tau`. PGD starts at ``x`` itself (FAT's start
    noise, 0.001, is negligible; a start anywhere in the ball could already lie far across the
    boundary, which is what friendly data avoids). The model is trained on the friendly
    adversarial data only (cross-entropy), as in FAT's code.
    """
    model, c = ctx.model, ctx.config
    tau = fat_tau(ctx.epoch, c.epochs)
    budget = torch.full((len(y),), tau, dtype=torch.long, device=x.device)
    # The predicate sees the active samples only: the label carries the sample's row index.
    labels = torch.stack([y, torch.arange(len(y), device=x.device)], dim=1)

    def ce(logits, yi):
        return F.cross_entropy(logits, yi[:, 0], reduction="none")

    def budget_spent(logits, yi):
        rows = yi[:, 1]
        wrong = logits.argmax(1) != yi[:, 0]
        stop = wrong & (budget[rows] == 0)
        budget[rows[wrong & ~stop]] -= 1
        return stop

    run = run_pgd(model, x, labels, c.eps, loss=ce, stop_if=budget_spent, random_start=False,
                  **ctx.pgd_kwargs())
    logits_adv = model(run.x_adv)
    return F.cross_entropy(logits_adv, y), {
        "adv_wrong": float((logits_adv.argmax(1) != y).sum()), "tau": float(tau) * len(y),
        "stopped": float((run.stopped_at >= 0).sum())}


# ------------------------------------------------------------------------------------ GAIRAT
def gairat_weights(kappa: torch.Tensor, steps: int, lam: float) -> torch.Tensor:
    """GAIRAT's instance weights from the geometry values ``kappa (B,)`` (PGD iterates, of
    ``steps``, that were still classified correctly): ``(1 + tanh(lam + 5 (1 - 2 kappa / K))) / 2``
    with ``K / 2`` taken as ``int(steps / 2)`` as in GAIRAT's code, normalised to mean 1."""
    half = int(steps / 2)
    weights = (torch.tanh(lam + (half - kappa.float()) * 5 / half) + 1) / 2
    return weights * len(weights) / weights.sum()


def gairat(ctx: BatchContext, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """GAIRAT (Zhang et al., ICLR 2021): geometry-aware instance-reweighted adversarial training.

    PGD runs all its steps; a sample's geometry value ``kappa`` counts the iterates (the start
    included, the last excluded) at which it was still classified correctly. Before the begin
    epoch (``config.gairat_begin_epoch``, default half of the epochs) the loss is the plain mean
    cross-entropy on the PGD examples; from it on each sample's cross-entropy is weighted by
    :func:`gairat_weights` with ``lambda = config.gairat_lambda`` (-1, GAIRAT's fixed schedule).
    """
    model, c = ctx.model, ctx.config
    kappa = torch.zeros(len(y), dtype=torch.long, device=x.device)

    def ce_counting_kappa(logits, yb):
        # Without stop_if every iterate is the whole batch, in order.
        kappa.add_((logits.detach().argmax(1) == yb).long())
        return F.cross_entropy(logits, yb, reduction="none")

    x_adv = run_pgd(model, x, y, c.eps, loss=ce_counting_kappa, **ctx.pgd_kwargs()).x_adv
    logits_adv = model(x_adv)
    per_sample = F.cross_entropy(logits_adv, y, reduction="none")
    begin = c.gairat_begin_epoch if c.gairat_begin_epoch is not None else c.epochs // 2
    if ctx.epoch >= begin:
        loss = (per_sample * gairat_weights(kappa, c.attack.steps, c.gairat_lambda)).mean()
    else:
        loss = per_sample.mean()
    return loss, {"adv_wrong": float((logits_adv.argmax(1) != y).sum()),
                  "kappa_sum": float(kappa.sum())}


BASELINES: Dict[str, Callable[[BatchContext, torch.Tensor, torch.Tensor],
                              Tuple[torch.Tensor, Stats]]] = {
    "trades": trades, "mma": mma, "ddn": ddn_training, "fat": fat, "gairat": gairat}
