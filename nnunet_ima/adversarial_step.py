"""The adversarial step of a training step: vanilla PGD training and IMA (Algorithm 1).

A training step of either method runs the network on the clean batch, builds the inputs of the
adversarial term, runs the network on them, and takes one optimiser step on the weighted sum of
the two losses. This module is the middle part, in plain PyTorch, for the nnU-Net trainers and
the classification trainer alike:

* :class:`PGDStep`: PGD at a fixed budget on every sample (vanilla adversarial training);
* :class:`IMAStep`: BPGD (Algorithm 3) at each sample's margin; an :class:`IMARecipe` says which
  samples are attacked, which points enter the adversarial term with which weight, and where
  PGD starts.

Both return an :class:`AdversarialBatch`: the adversarial inputs, their targets and the weight of
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
from torch import nn

from nnunet_ima.attacks import LossFn, Predicate, argmax_correct, bpgd, pgd, select
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.margins import MarginStore

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
