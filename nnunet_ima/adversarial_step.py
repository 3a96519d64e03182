"""The adversarial step of a training step: vanilla PGD training and IMA (Algorithm 1).

A training step of either method runs the network on the clean batch, builds the inputs of the
adversarial term, runs the network on them, and takes one optimiser step on the weighted sum of
the two losses. This module is the middle part, in plain PyTorch, for the nnU-Net trainers and
the classification trainer alike:

* :class:`PGDStep`: PGD at a fixed budget on every sample (vanilla adversarial training);
* :class:`IMAStep`: BPGD (Algorithm 3) at each sample's margin; an :class:`IMARecipe` says which
  samples are attacked, which points enter the adversarial term with which weight, and where
  PGD starts;
* :class:`NFGSMStep`: N-FGSM's single step from a noisy point, not projected back;
* :class:`TRADESStep`: PGD on the KL between the clean and the adversarial softmax
  (:func:`kl_to_reference`, which TRADES' training loss reads too).

Each returns an :class:`AdversarialBatch`: the adversarial inputs, their targets and the weight of
their batch-mean loss. IMA's also carries :class:`MarginEvidence`, the per-sample records from
which Algorithm 2 updates the margins at the end of the epoch::

    step = IMAStep(ima, attack, is_correct=argmax_correct)
    adversarial = step(model, x, y, clean_logits, keys, margins)
    adversarial.evidence.record(margins)      # every step
    margins.end_epoch()                       # once per epoch

The steps read the margin store and never change it. With a batch-mean loss, the printed
recipe's ``(1 - beta) * loss(X) + beta * M / B * loss(X_boundary)`` equals Algorithm 1's
``((1 - beta) * sum loss(x) + beta * sum loss(x_boundary)) / B``
(:func:`nnunet_ima.losses.ima_loss` computes the latter from per-sample losses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.attacks import LossFn, Predicate, argmax_correct, bpgd, pgd, run_pgd, select
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.losses import full_resolution
from nnunet_ima.margins import MarginStore
from nnunet_ima.norms import as_eps_tensor, check_norm, random_in_ball

ATTACK_SLICES = ("correct", "all")
ADVERSARIAL_TERMS = ("crossed", "all")
START_POINTS = ("ball", "inner_sphere")


@dataclass(frozen=True)
class IMARecipe:
    """The choices in which readings of IMA's Algorithm 1 differ.

    Attributes:
        attack_slices: ``"correct"`` (BPGD on the clean-correct samples, as printed) or ``"all"``
            (every sample; a clean-wrong sample then crosses at its start point).
        adversarial_term: ``"crossed"`` (the boundary points of the ``M`` samples that crossed,
            weight ``beta * M / B``, as printed) or ``"all"`` (the point of every attacked
            sample: its boundary point, or its last PGD iterate where it did not cross; weight
            ``beta``).
        start_point: ``"ball"`` (PGD's random start in the ball of radius ``E``) or
            ``"inner_sphere"`` (on the sphere of radius ``max(E - delta, delta)``, cut to ``E``:
            the IMA authors' segmentation code).
    """

    attack_slices: str = "correct"
    adversarial_term: str = "crossed"
    start_point: str = "ball"

    def __post_init__(self):
        for name, allowed in (("attack_slices", ATTACK_SLICES),
                              ("adversarial_term", ADVERSARIAL_TERMS),
                              ("start_point", START_POINTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


PRINTED = IMARecipe()
"""Algorithm 1 as printed in the paper (the classification trainer's IMA)."""


@dataclass
class MarginEvidence:
    """What IMA's attack showed about the margins of one batch of ``B`` samples.

    Attributes:
        keys: the ``B`` sample keys of the margin store.
        clean_correct: ``(B,)`` bool on the CPU, the clean sample is correct.
        crossed: ``(B,)`` bool on the CPU, BPGD found a boundary point within the margin.
        distance: ``(B,)`` float on the CPU, the distance of the point BPGD returned (the
            boundary point where crossed; 0 for a sample not attacked). The margin store reads
            it only where crossed.
        attacked: how many samples BPGD attacked.
        crossed_correct: how many clean-correct samples crossed. A clean-wrong sample "crosses"
            at its start point; the store counts it as clean-wrong, so it is not counted here.
    """

    keys: List[Hashable]
    clean_correct: torch.Tensor
    crossed: torch.Tensor
    distance: torch.Tensor
    attacked: int
    crossed_correct: int

    def record(self, store: MarginStore) -> None:
        """Add these records to ``store`` for its end-of-epoch update (Algorithm 2)."""
        store.record(self.keys, self.crossed, self.distance, self.clean_correct)


@dataclass
class AdversarialBatch:
    """The adversarial term of one training step.

    Attributes:
        x: ``(M, ...)`` adversarial inputs (``M`` may be 0: then there is no term).
        target: their targets (a tensor or a list of tensors with the batch dimension ``M``).
        weight: the weight of their batch-mean loss in the step's loss.
        evidence: IMA's records for the margin update; ``None`` for a fixed-budget attack.
    """

    x: torch.Tensor
    target: Any
    weight: float
    evidence: Optional[MarginEvidence] = None


def _check_weight(weight: float, name: str) -> float:
    if not 0 <= weight <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {weight!r}")
    return weight


class PGDStep:
    """Vanilla adversarial training's attack: PGD at budget ``eps`` on every sample.

    Args:
        eps: the L2 / Linf budget, a scalar or ``(B,)``.
        attack: the PGD settings (its ``norm``, ``steps``, ``alpha``, ``random_start``).
        weight: the weight of the adversarial term (1/2 for ``(loss(x) + loss(x_adv)) / 2``).
        loss: the per-sample loss PGD maximises, ``(output, y) -> (B,)``, or ``"ce"`` / ``"margin"``.
        clamp: the value range of the inputs (``None``: unbounded), as in :func:`pgd`.
    """

    def __init__(self, eps: Union[float, torch.Tensor], attack: AttackConfig, weight: float = 0.5,
                 loss: Union[str, LossFn] = "ce", clamp: Optional[tuple] = None):
        self.eps, self.attack, self.loss, self.clamp = eps, attack, loss, clamp
        self.weight = _check_weight(weight, "weight")

    def __call__(self, network: nn.Module, x: torch.Tensor, y: Any,
                 generator: Optional[torch.Generator] = None) -> AdversarialBatch:
        """PGD on the batch ``x (B, ...)`` with targets ``y``; the term has all ``B`` samples."""
        attack = self.attack
        x_adv = pgd(network, x, y, self.eps, norm=attack.norm, steps=attack.steps,
                    alpha=attack.alpha, loss=self.loss, random_start=attack.random_start,
                    clamp=self.clamp, generator=generator)
        return AdversarialBatch(x_adv, y, self.weight)


class IMAStep:
    """IMA's attack (Algorithm 1): BPGD at each sample's margin, the term as ``recipe`` says.

    Args:
        ima: IMA's settings (its ``beta``, ``binary_steps`` and ``boundary``).
        attack: the PGD settings inside BPGD (its ``norm``, ``steps``, ``alpha``,
            ``random_start``).
        is_correct: ``(output, y) -> (B,) bool``, the correctness of a sample (argmax for
            classification, the Dice threshold for segmentation).
        loss: the per-sample loss PGD maximises, as in :class:`PGDStep`.
        recipe: the reading of Algorithm 1 (:data:`PRINTED` by default).
        clamp: the value range of the inputs, as in :func:`bpgd`.
    """

    def __init__(self, ima: IMAConfig, attack: AttackConfig, is_correct: Predicate = argmax_correct,
                 loss: Union[str, LossFn] = "ce", recipe: IMARecipe = PRINTED,
                 clamp: Optional[tuple] = None):
        self.ima, self.attack, self.is_correct = ima, attack, is_correct
        self.loss, self.recipe, self.clamp = loss, recipe, clamp

    def __call__(self, network: nn.Module, x: torch.Tensor, y: Any, clean_output: Any,
                 keys: Sequence[Hashable], margins: MarginStore,
                 generator: Optional[torch.Generator] = None) -> AdversarialBatch:
        """The adversarial term and the margin evidence of the batch ``x (B, ...)``.

        Args:
            clean_output: the network's (detached) output on ``x``, which splits the batch into
                correct and wrong samples.
            keys: the ``B`` sample keys; ``margins`` gives their budgets ``E``.
            generator: the random generator of PGD's start points.
        """
        batch_size = x.shape[0]
        if len(keys) != batch_size:
            raise ValueError(f"{len(keys)} sample keys for a batch of {batch_size}: pass one key "
                             f"per sample")
        recipe, ima, attack = self.recipe, self.ima, self.attack
        correct = self.is_correct(clean_output, y)
        crossed = torch.zeros(batch_size, dtype=torch.bool)
        distance = torch.zeros(batch_size)

        attacked = correct if recipe.attack_slices == "correct" else torch.ones_like(correct)
        idx = attacked.nonzero().flatten()
        if idx.numel() == 0:  # no term: an empty batch of inputs and targets
            x_adv, target_adv, weight = x[idx], select(y, idx), 0.0
        else:
            eps = margins.get([keys[i] for i in idx.tolist()], device=x.device)
            start_radius = None
            if recipe.start_point == "inner_sphere":
                delta = margins.delta
                start_radius = (eps - delta).clamp_min(delta)
            y_attacked = select(y, idx)
            result = bpgd(network, x[idx], y_attacked, eps, self.is_correct,
                          norm=attack.norm, steps=attack.steps, alpha=attack.alpha,
                          binary_steps=ima.binary_steps, loss=self.loss,
                          random_start=attack.random_start, clamp=self.clamp,
                          boundary=ima.boundary, generator=generator, start_radius=start_radius)
            found = result.found.cpu()
            crossed[idx.cpu()] = found
            distance[idx.cpu()] = result.distance.detach().float().cpu()
            if recipe.adversarial_term == "all":
                x_adv, target_adv, weight = result.x_boundary, y_attacked, ima.beta
            else:
                x_adv = result.x_boundary[result.found]
                target_adv = select(y, idx[result.found])
                weight = ima.beta * int(found.sum()) / batch_size
        correct = correct.cpu()
        evidence = MarginEvidence(list(keys), correct, crossed, distance, int(idx.numel()),
                                  int((crossed & correct).sum()))
        return AdversarialBatch(x_adv, target_adv, weight, evidence)


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``KL(reference || softmax(logits))`` per sample, over the class dimension 1.

    Args:
        logits: ``(B, K)`` or ``(B, K, ...)`` (a segmentation output: ``(B, K, H, W)``).
        reference: probabilities of the same shape (TRADES: the clean softmax).

    Returns:
        ``(B,)``: the KL of each sample; for a segmentation output the KL of each pixel,
        averaged over the sample's pixels. Both arguments carry gradients where they have them.
    """
    log_ratio = reference.clamp_min(1e-12).log() - F.log_softmax(logits, dim=1)
    kl = (reference * log_ratio).sum(dim=1)
    return kl if kl.dim() == 1 else kl.flatten(1).mean(dim=1)


class NFGSMStep:
    """N-FGSM's attack (de Jorge et al., NeurIPS 2022, "Make some noise"): one step from a noisy
    point, not projected back.

    ``x_adv = x + xi + eps * h(grad)`` with ``xi`` random in the ball of radius
    ``noise_factor * eps`` (:func:`~nnunet_ima.norms.random_in_ball`), ``h`` the steepest-ascent
    direction of the norm (``sign`` for Linf, the unit gradient for L2) at ``x + xi``: the paper's
    step ``alpha = eps`` and ``k = 2``. The point may lie up to ``(noise_factor + 1) * eps`` from
    ``x``; the paper finds that clipping it to the ``eps`` ball brings back catastrophic
    overfitting.

    The step is the core PGD loop with one step from the start ``xi``, in the ball of radius
    ``(noise_factor + 1) * eps``: every point the step can reach lies inside it, so the loop's
    projection leaves the point as it is.

    Args:
        eps: the budget, a scalar or ``(B,)``.
        norm: ``"l2"`` or ``"linf"``.
        weight: the weight of the adversarial term, as in :class:`PGDStep`.
        noise_factor: ``k``, the noise radius in units of ``eps``.
        loss: the per-sample loss the step ascends, as in :class:`PGDStep`.
        clamp: the value range of the inputs, as in :func:`~nnunet_ima.attacks.pgd`.
    """

    def __init__(self, eps: Union[float, torch.Tensor], norm: str, weight: float = 0.5,
                 noise_factor: float = 2.0, loss: Union[str, LossFn] = "ce",
                 clamp: Optional[tuple] = None):
        if not noise_factor >= 0:
            raise ValueError(f"noise_factor must be >= 0, got {noise_factor!r}")
        self.eps, self.norm, self.noise_factor = eps, check_norm(norm), float(noise_factor)
        self.loss, self.clamp = loss, clamp
        self.weight = _check_weight(weight, "weight")

    def __call__(self, network: nn.Module, x: torch.Tensor, y: Any,
                 generator: Optional[torch.Generator] = None) -> AdversarialBatch:
        """The N-FGSM point of every sample of ``x (B, ...)``; the term has all ``B`` samples."""
        eps = as_eps_tensor(self.eps, x)
        reach = self.noise_factor + 1.0
        noise = random_in_ball(x, self.noise_factor * eps, self.norm, generator)
        run = run_pgd(network, x, y, reach * eps, norm=self.norm, steps=1, alpha=1.0 / reach,
                      loss=self.loss, start=noise, clamp=self.clamp)
        return AdversarialBatch(run.x_adv, y, self.weight)


class TRADESStep:
    """TRADES' attack (Zhang et al., ICML 2019): PGD on ``KL(f(x) || f(x'))`` in the ``eps`` ball.

    The clean softmax is the fixed reference (detached); the KL is per pixel, averaged over each
    sample (:func:`kl_to_reference`), at the full-resolution output. PGD starts at
    ``x + start_std * N(0, I)``, as the TRADES code does: at ``x`` itself the KL and its gradient
    are 0, so the attack could not leave it.

    The training loss of TRADES, ``loss(f(x), y) + beta * KL(f(x) || f(x_adv))``, needs the clean
    output with its graph, which the caller holds: the returned batch's ``weight`` is ``beta``
    and :func:`kl_to_reference` gives the term.

    Args:
        eps: the budget, a scalar or ``(B,)``.
        attack: the PGD settings (its ``norm``, ``steps``, ``alpha``; the start is TRADES').
        beta: the weight of the KL term in the training loss.
        start_std: the standard deviation of the Gaussian start offset, in input units.
        clamp: the value range of the inputs, as in :func:`~nnunet_ima.attacks.pgd`.
    """

    def __init__(self, eps: Union[float, torch.Tensor], attack: AttackConfig, beta: float,
                 start_std: float = 0.001, clamp: Optional[tuple] = None):
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.eps, self.attack, self.beta = eps, attack, float(beta)
        self.start_std, self.clamp = start_std, clamp

    def __call__(self, network: nn.Module, x: torch.Tensor, y: Any, clean_output: Any,
                 generator: Optional[torch.Generator] = None) -> AdversarialBatch:
        """The TRADES point of every sample of ``x (B, ...)``.

        Args:
            y: the targets, carried to the returned batch (the attack does not read them).
            clean_output: the network's output on ``x`` (a tensor, or nnU-Net's
                deep-supervision list); only its full resolution is read, detached.
        """
        reference = F.softmax(full_resolution(clean_output).detach().float(), dim=1)
        start = self.start_std * torch.randn(x.shape, generator=generator, dtype=torch.float32,
                                             device="cpu").to(x.device)

        def kl(output: Any, p_clean: torch.Tensor) -> torch.Tensor:
            return kl_to_reference(full_resolution(output).float(), p_clean)

        attack = self.attack
        x_adv = run_pgd(network, x, reference, self.eps, norm=attack.norm, steps=attack.steps,
                        alpha=attack.alpha, loss=kl, start=start, clamp=self.clamp,
                        generator=generator).x_adv
        return AdversarialBatch(x_adv, y, self.beta)
