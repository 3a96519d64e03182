"""SPSA: the gradient-free attack of Uesato et al. 2018 for L2 and Linf budgets.

"Adversarial Risk and the Dangers of Evaluating Against Weak Attacks" (ICML 2018) attacks a
network through its outputs only, so a defence that hides or zeroes its input gradients
(gradient masking) does not stop it. Per step and per sample:

1. draw ``samples`` Rademacher directions ``v_k`` in ``{-1, +1}^D``;
2. estimate the gradient of the margin loss ``L`` (largest other logit minus the true logit) by
   antithetic finite differences, ``g = mean_k (L(x + delta v_k) - L(x - delta v_k)) / (2 delta) * v_k``
   (``2 * samples`` forward passes);
3. update Adam's moments with ``g`` (the standard ``beta1 = 0.9``, ``beta2 = 0.999``) and
   step: Linf along Adam's direction, ``step * m_hat / (sqrt(v_hat) + 1e-8)``; L2 along the
   averaged estimate ``step * m_hat / ||m_hat||_2`` (Adam's per-coordinate scaling tends to
   ``sign(g)``, the Linf steepest direction, which in an L2 ball stalls at the wrong point of
   the sphere; unit-L2 normalisation is what our L2 PGD does);
4. project onto the ``eps`` ball (``nnunet_ima.norms.project``) and the valid input range, and
   check the prediction (one forward pass); a fooled sample keeps that point and stops.

Settings: finite-difference size ``delta = 0.01`` and an Adam update, the values of the
paper's reference implementations: CleverHans defaults to ``delta = 0.01``, learning rate 0.01
and 128 evaluations (64 antithetic pairs, our default) per step; AdverTorch and torchattacks
use the same ``delta`` and learning rate. The iterate starts at the clean input, as in AdverTorch and torchattacks (CleverHans
draws a random start). A learning rate of 0.01 is an absolute step for ``[0, 1]`` images; here
the step is ``step_fraction * eps`` (default ``eps / 10``, the step of our 100-PGD), so the
attack sweeps the ball alike at every budget and in every input unit (moons points, CT slices).
At the first step Adam's direction is exactly ``sign(g)``, so SPSA's first Linf step equals a
PGD step taken along the estimated gradient.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
from torch import nn

from nnunet_ima.attacks import margin_loss
from nnunet_ima.model_mode import attack_mode
from nnunet_ima.norms import (as_eps_tensor, check_norm, clamp_to_range, per_sample_norm,
                              per_sample_view, project)

_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
_TINY = 1e-12


@dataclass(frozen=True)
class SPSASettings:
    """The attack's knobs (defaults: 100 iterations, 64 direction pairs = 128 queries per step).

    Attributes:
        iterations: Adam steps per sample (a fooled sample stops early).
        samples: Rademacher directions per step; each costs two forward passes.
        delta: finite-difference size, in input units (the paper's 0.01).
        step_fraction: the step is ``step_fraction * eps``.
        query_batch: the most rows one forward pass evaluates (bounds memory, not the result).
    """

    iterations: int = 100
    samples: int = 64
    delta: float = 0.01
    step_fraction: float = 0.1
    query_batch: int = 8192

    def validate(self) -> "SPSASettings":
        for name in ("iterations", "samples", "query_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SPSA {name} must be an integer >= 1, got {value!r}")
        for name in ("delta", "step_fraction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SPSA {name} must be > 0, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": "margin", "update": "adam", "beta1": _ADAM_BETA1,
                "beta2": _ADAM_BETA2}


@dataclass
class SPSAResult:
    """``x_adv (B, ...)``: the fooling point of fooled samples, the last iterate of the others;
    ``fooled (B,)`` bool; ``forward_samples``: rows that went through the network."""

    x_adv: torch.Tensor
    fooled: torch.Tensor
    forward_samples: int


@torch.no_grad()
def _gradient_estimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SPSASettings,
                       generator: Optional[torch.Generator]) -> torch.Tensor:
    """SPSA estimate of ``d margin_loss / dx``: ``(a, ...)`` from ``x (a, ...)``, ``y (a,)``."""
    a = x.shape[0]
    grad = torch.zeros_like(x)
    # Directions are evaluated in chunks of at most query_batch rows (2 rows per direction).
    chunk = max(1, settings.query_batch // (2 * a))
    for start in range(0, settings.samples, chunk):
        k = min(chunk, settings.samples - start)
        v = torch.randint(0, 2, (a, k, *x.shape[1:]), generator=generator, device="cpu")
        v = (2 * v - 1).to(device=x.device, dtype=x.dtype)                    # (a, k, ...)
        centre = x.unsqueeze(1)
        queries = torch.cat([centre + settings.delta * v, centre - settings.delta * v], dim=1)
        labels = y.view(a, 1).expand(a, 2 * k).reshape(-1)
        loss = margin_loss(model(queries.reshape(a * 2 * k, *x.shape[1:])), labels).view(a, 2 * k)
        slope = (loss[:, :k] - loss[:, k:]) / (2 * settings.delta)           # (a, k)
        # 1 / v_k = v_k for a Rademacher direction.
        grad += (slope.view(a, k, *([1] * (x.dim() - 1))).to(x.dtype) * v).sum(dim=1)
    return grad / settings.samples


def spsa(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Union[float, torch.Tensor], *,
         norm: str = "l2", settings: SPSASettings = SPSASettings(),
         clamp: Optional[tuple] = None, generator: Optional[torch.Generator] = None) -> SPSAResult:
    """Untargeted SPSA inside the ball ``||x_adv - x|| <= eps`` (module docstring).

    Args:
        model: classifier returning ``(B, K)`` logits; queried without gradients, in eval mode.
        x: ``(B, ...)`` clean inputs, not modified; ``y``: ``(B,)`` labels.
        eps: scalar or ``(B,)`` budget in ``norm`` (``"l2"`` or ``"linf"``).
        clamp: ``None`` or ``(low, high)``, the valid input range of ``x_adv``.
        generator: draws the Rademacher directions (CPU generator).

    Returns:
        :class:`SPSAResult`; ``x_adv`` always lies in the ball and in ``clamp``.
    """
    norm = check_norm(norm)
    settings = settings.validate()
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not torch.isfinite(x).all():
        raise ValueError("x must be a finite (B, ...) tensor")
    x = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
    eps = as_eps_tensor(eps, x)
    step = settings.step_fraction * eps
    x_adv = x.clone()
    m = torch.zeros_like(x)
    v2 = torch.zeros_like(x)
    forward_samples = 0
    with attack_mode(model), torch.no_grad():
        fooled = model(x).argmax(dim=1) != y
        forward_samples += x.shape[0]
        active = (~fooled & (eps > 0)).nonzero().flatten()
        for t in range(1, settings.iterations + 1):
            if active.numel() == 0:
                break
            xa, ya = x_adv[active], y[active]
            g = _gradient_estimate(model, xa, ya, settings, generator)
            forward_samples += 2 * settings.samples * active.numel()
            m[active] = _ADAM_BETA1 * m[active] + (1 - _ADAM_BETA1) * g
            v2[active] = _ADAM_BETA2 * v2[active] + (1 - _ADAM_BETA2) * g * g
            m_hat = m[active] / (1 - _ADAM_BETA1 ** t)
            v_hat = v2[active] / (1 - _ADAM_BETA2 ** t)
            if norm == "linf":
                direction = m_hat / (v_hat.sqrt() + _ADAM_EPS)
            else:
                # Adam's per-coordinate scaling is Linf geometry (it tends to sign(g)) and would
                # pull an L2 attack towards a corner of the cube instead of along the gradient.
                direction = m_hat / per_sample_view(per_sample_norm(m_hat, "l2").clamp_min(_TINY), m_hat)
            moved = xa + per_sample_view(step[active], xa) * direction
            delta = project(moved - x[active], eps[active], norm)
            x_adv[active] = clamp_to_range(x[active] + delta, clamp)
            now_fooled = model(x_adv[active]).argmax(dim=1) != ya
            forward_samples += active.numel()
            fooled[active[now_fooled]] = True
            active = active[~now_fooled]
    return SPSAResult(x_adv, fooled, forward_samples)
