"""PGD and BPGD (the boundary-finding PGD of IMA's Algorithm 3).

Both attacks take any network ``model`` and per-sample budgets ``eps`` (a scalar or a ``(B,)``
tensor). The network's output may be a tensor or a list/tuple of tensors (nnU-Net's deep
supervision); the loss and the correctness predicate receive it as the network returned it.

Shapes: ``x`` is ``(B, ...)`` (``(B, D)`` vectors, ``(B, C, H, W)`` images or 2D slices), ``y`` is
anything with a batch dimension (``(B,)`` class indices, ``(B, 1, H, W)`` label maps, or a list
of such tensors, one per deep-supervision scale).

Cost model (used by the benchmarks): each attack counts the samples that went through a
forward pass and a backward pass, so early stopping shows up in the counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.model_mode import attack_mode
from nnunet_ima.norms import (as_eps_tensor, check_norm, clamp_to_range, per_sample_norm,
                              project, random_in_ball, random_on_sphere,
                              steepest_ascent_direction)

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss(output, y) -> (B,)``: a per-sample loss that the attack maximises."""

LossSchedule = Callable[[int], LossFn]
"""``t -> loss`` of PGD step ``t = 1..steps``: an objective that changes along the attack."""

Predicate = Callable[[Any, Any], torch.Tensor]
"""``predicate(output, y) -> (B,) bool``: e.g. "is this sample still classified correctly"."""

BOUNDARY_POINTS = ("last_correct", "midpoint")


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy. ``logits (B, K)``, ``y (B,)`` -> ``(B,)``."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest other logit minus the true logit (positive once misclassified). ``(B, K), (B,) -> (B,)``."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf"))
    return others.amax(dim=1) - true


def argmax_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Classification correctness. ``logits (B, K)``, ``y (B,)`` -> ``(B,)`` bool."""
    return logits.argmax(dim=1) == y


NAMED_LOSSES = {"ce": cross_entropy_loss, "margin": margin_loss}


def resolve_loss(loss: Union[str, LossFn]) -> LossFn:
    """Map ``"ce"`` / ``"margin"`` to their functions; pass a callable through."""
    if callable(loss):
        return loss
    if loss not in NAMED_LOSSES:
        raise ValueError(f"loss must be one of {tuple(NAMED_LOSSES)} or a callable "
                         f"(output, y) -> (B,) per-sample loss, got {loss!r}")
    return NAMED_LOSSES[loss]


def select(batch_obj: Any, index: torch.Tensor) -> Any:
    """Take samples ``index`` from a tensor or a (nested) list/tuple of tensors."""
    if isinstance(batch_obj, torch.Tensor):
        return batch_obj[index.to(batch_obj.device)]
    if isinstance(batch_obj, (list, tuple)):
        return type(batch_obj)(select(item, index) for item in batch_obj)
    raise TypeError(f"cannot index a batch of type {type(batch_obj).__name__}")


def detach(output: Any) -> Any:
    """Detach a tensor or a (nested) list/tuple of tensors."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (list, tuple)):
        return type(output)(detach(o) for o in output)
    return output


def _batch_size(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0]
    return _batch_size(obj[0])


def validate_attack_input(x: torch.Tensor, y: Any, steps: int, alpha: float) -> None:
    """Raise ``ValueError`` naming the argument when the attack input is unusable."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a (B, ...) tensor with a batch dimension")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"x contains {bad} NaN or infinite values; clean or re-preprocess the "
                         f"input before attacking it")
    if _batch_size(y) != x.shape[0]:
        raise ValueError(f"y has batch size {_batch_size(y)} but x has {x.shape[0]}: "
                         f"pass one label (map) per sample")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")


def _working_precision(x: torch.Tensor) -> torch.Tensor:
    # Half-precision inputs are attacked in fp32: small input gradients underflow in fp16.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass
class PGDRun:
    """The outcome of :func:`run_pgd`.

    Attributes:
        x_adv: ``(B, ...)`` last iterate of each sample (the first iterate that met ``stop_if``
            for a stopped sample).
        stopped_at: ``(B,)`` long, the iterate index ``i`` (0 = the start point) at which
            ``stop_if`` first held, or ``-1``.
        x_before_stop: ``(B, ...)`` the iterate before the stopping one (``x`` itself when the
            start point already met ``stop_if``); only filled when ``track_previous`` is set.
        forward_samples / backward_samples: samples that went through a forward / backward pass.
    """

    x_adv: torch.Tensor
    stopped_at: torch.Tensor
    x_before_stop: Optional[torch.Tensor]
    forward_samples: int
    backward_samples: int


def run_pgd(model: nn.Module, x: torch.Tensor, y: Any, eps: Union[float, torch.Tensor], *,
            norm: str = "l2", steps: int = 20, alpha: float = 4.0, loss: Union[str, LossFn] = "ce",
            random_start: bool = True, clamp: Optional[tuple] = None,
            stop_if: Optional[Predicate] = None, track_previous: bool = False,
            generator: Optional[torch.Generator] = None, eval_mode: bool = True,
            start_radius: Optional[torch.Tensor] = None, start: Optional[torch.Tensor] = None,
            loss_schedule: Optional[LossSchedule] = None) -> PGDRun:
    """The PGD loop: :func:`pgd`, :func:`bpgd`, the trainers and the evaluator's PGD and SegPGD.

    ``x_0 = x + xi``, then ``x_i = proj(x_{i-1} + step * h(grad))`` for ``i = 1..steps`` with
    ``step = alpha * eps / steps``. The offset ``xi`` is ``start`` when given (a ``(B, ...)``
    tensor inside the ball, drawn by the caller as advertorch's ``delta_init`` is), otherwise
    random in the ball when ``random_start`` (see :func:`start_offset`), otherwise 0.
    When ``stop_if`` is given, each iterate (the start point included) is checked on the
    forward pass that also gives its gradient, and a sample that meets it takes no further steps;
    one extra forward checks the last iterate. ``start_radius`` (``(B,)``, with
    ``random_start``) puts each start point on the sphere of that radius instead, projected into
    the ball (the IMA authors' segmentation code starts at ``max(E - delta, delta)``).
    ``loss_schedule`` (``t -> loss`` of step ``t = 1..steps``) replaces ``loss`` where the
    objective changes along the way (SegPGD's weights).
    """
    norm = check_norm(norm)
    validate_attack_input(x, y, steps, alpha)
    loss_fn = resolve_loss(loss)
    x = _working_precision(x.detach())
    eps = as_eps_tensor(eps, x)
    step_size = alpha * eps / max(steps, 1)
    batch = x.shape[0]

    if start is not None and start_radius is not None:
        raise ValueError("start and start_radius both place the start point: pass one of them")
    if start is None and random_start:
        start = start_offset(x, eps, norm, start_radius, generator)
    x_cur = start_point(x, start, clamp)
    x_previous = x.clone() if track_previous else None
    stopped_at = torch.full((batch,), -1, dtype=torch.long, device=x.device)
    active = torch.arange(batch, device=x.device)
    forward_samples = backward_samples = 0

    with attack_mode(model, eval_mode=eval_mode):
        for i in range(steps + 1):
            last = i == steps
            if active.numel() == 0 or (last and stop_if is None):
                break
            x_active = x_cur[active].requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                output = model(x_active)
            forward_samples += active.numel()
            y_active = select(y, active)

            keep = torch.ones(active.numel(), dtype=torch.bool, device=x.device)
            if stop_if is not None:
                with torch.no_grad():
                    keep = ~stop_if(detach(output), y_active).bool().to(x.device)
                stopped_at[active[~keep]] = i
            if last or not keep.any():
                active = active[keep]
                continue

            step_loss = loss_fn if loss_schedule is None else loss_schedule(i + 1)
            per_sample = step_loss(output, y_active)
            (grad,) = torch.autograd.grad(per_sample[keep].sum(), x_active)
            backward_samples += active.numel()

            idx = active[keep]
            if x_previous is not None:
                x_previous[idx] = x_cur[idx]
            stepped = x_cur[idx] + step_size[idx].view(-1, *([1] * (x.dim() - 1))) \
                * steepest_ascent_direction(grad[keep], norm)
            delta = project(stepped - x[idx], eps[idx], norm)
            x_cur[idx] = clamp_to_range(x[idx] + delta, _select_clamp(clamp, idx))
            active = idx

    return PGDRun(x_cur.detach(), stopped_at, x_previous, forward_samples, backward_samples)


def start_offset(x: torch.Tensor, eps: torch.Tensor, norm: str,
                 radius: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random start offset ``(B, ...)`` shaped like ``x``: in the ball of ``eps`` ``(B,)``
    (:func:`~nnunet_ima.norms.random_in_ball`), or, with ``radius`` ``(B,)``, on the sphere of
    radius ``min(radius, eps)``."""
    if radius is None:
        return random_in_ball(x, eps, norm, generator)
    radius = torch.minimum(as_eps_tensor(radius, x, "start_radius"), eps)
    return random_on_sphere(x, radius, norm, generator)


def start_point(x: torch.Tensor, start: Optional[torch.Tensor],
                clamp: Optional[tuple] = None) -> torch.Tensor:
    """``x + start`` in the value range ``clamp``, or a copy of ``x`` when ``start`` is ``None``.

    Args:
        x: ``(B, ...)`` clean input; start: ``(B, ...)`` offset, or ``None``.
    """
    if start is None:
        return x.clone()
    if tuple(start.shape) != tuple(x.shape):
        raise ValueError(f"start must have the shape of x {tuple(x.shape)}, "
                         f"got {tuple(start.shape)}: pass one offset per sample")
    return clamp_to_range(x + start.to(x), clamp)


def _select_clamp(clamp: Optional[tuple], idx: torch.Tensor) -> Optional[tuple]:
    if clamp is None:
        return None
    return tuple(b[idx] if isinstance(b, torch.Tensor) and b.dim() == 1 else b for b in clamp)


def pgd(model: nn.Module, x: torch.Tensor, y: Any, eps: Union[float, torch.Tensor], *,
        norm: str = "l2", steps: int = 20, alpha: float = 4.0, loss: Union[str, LossFn] = "ce",
        random_start: bool = True, clamp: Optional[tuple] = None,
        stop_if: Optional[Predicate] = None, generator: Optional[torch.Generator] = None,
        eval_mode: bool = True) -> torch.Tensor:
    """Projected gradient ascent on ``loss`` inside the per-sample ball ``||x_adv - x|| <= eps``.

    Args:
        model: the network; its parameters, their ``.grad`` and its train/eval mode are left as
            they were (it runs in eval mode during the attack unless ``eval_mode=False``).
        x: ``(B, ...)`` clean input, not modified.
        y: labels with a batch dimension (see the module docstring).
        eps: scalar or ``(B,)`` budget, >= 0, in the units of ``x``.
        norm: ``"l2"`` (whole-sample L2) or ``"linf"``.
        steps, alpha: ``steps`` iterations of size ``alpha * eps / steps``.
        loss: ``"ce"``, ``"margin"`` or a callable ``(output, y) -> (B,)``.
        random_start: start from a random point of the ball.
        clamp: ``None`` (no value range: nnU-Net inputs are z-scored) or ``(low, high)``, floats or
            per-sample ``(B,)`` tensors.
        stop_if: optional predicate ``(output, y) -> (B,) bool``; a sample meeting it keeps that
            iterate and leaves the loop (e.g. "already misclassified" in evaluation).
        generator: random generator for the start point.

    Returns:
        ``(B, ...)`` adversarial input in the dtype of the computation (fp32 for half inputs).
    """
    return run_pgd(model, x, y, eps, norm=norm, steps=steps, alpha=alpha, loss=loss,
                   random_start=random_start, clamp=clamp, stop_if=stop_if,
                   generator=generator, eval_mode=eval_mode).x_adv


@dataclass
class BoundaryResult:
    """The outcome of :func:`bpgd`.

    Attributes:
        x_boundary: ``(B, ...)`` the boundary point for found samples; the last PGD iterate
            for the others.
        found: ``(B,)`` bool, the sample became incorrect within its budget.
        distance: ``(B,)`` ``||x_boundary - x||`` in the attack's norm (the margin estimate of a
            found sample).
        crossed_at: ``(B,)`` long, the PGD iterate at which the sample first became incorrect
            (0 = the random start point), ``-1`` when not found.
        forward_samples / backward_samples: the attack's cost, bisection included.
    """

    x_boundary: torch.Tensor
    found: torch.Tensor
    distance: torch.Tensor
    crossed_at: torch.Tensor
    forward_samples: int
    backward_samples: int


def bpgd(model: nn.Module, x: torch.Tensor, y: Any, eps: Union[float, torch.Tensor],
         is_correct: Predicate = argmax_correct, *, norm: str = "l2", steps: int = 20,
         alpha: float = 4.0, binary_steps: int = 10, loss: Union[str, LossFn] = "ce",
         random_start: bool = True, clamp: Optional[tuple] = None,
         boundary: str = "last_correct", generator: Optional[torch.Generator] = None,
         eval_mode: bool = True, start_radius: Optional[torch.Tensor] = None) -> BoundaryResult:
    """Find, per sample, a point on the decision boundary within ``eps`` (IMA's Algorithm 3).

    PGD runs and every iterate (the start point included) is checked with ``is_correct``. For a
    sample whose iterate ``x_b`` is the first incorrect one, ``x_a`` is the iterate before it
    (``x`` when the start point is already incorrect); ``binary_steps`` halvings of the segment
    ``[x_a, x_b]`` then locate the boundary. A sample stops taking PGD steps once it has crossed;
    bisection runs on crossed samples only.

    Args:
        is_correct: ``(output, y) -> (B,) bool``; argmax for classification, the Dice threshold
            for segmentation.
        binary_steps: number of halvings (the segment shrinks by ``2 ** binary_steps``).
        boundary: ``"last_correct"`` returns the correct end of the final segment (a point the
            network still gets right, at most one segment length from the boundary);
            ``"midpoint"`` returns its middle.
        start_radius: ``(B,)`` radius of the random start point (see :func:`run_pgd`).
        Other arguments as in :func:`pgd`.

    Returns:
        :class:`BoundaryResult`; ``distance`` is the per-sample margin estimate.
    """
    if boundary not in BOUNDARY_POINTS:
        raise ValueError(f"boundary must be one of {BOUNDARY_POINTS}, got {boundary!r}")
    if not isinstance(binary_steps, int) or binary_steps < 0:
        raise ValueError(f"binary_steps must be an integer >= 0, got {binary_steps!r}")

    def crossed(output, labels):
        return ~is_correct(output, labels).bool()

    run = run_pgd(model, x, y, eps, norm=norm, steps=steps, alpha=alpha, loss=loss,
                  random_start=random_start, clamp=clamp, stop_if=crossed,
                  track_previous=True, generator=generator, eval_mode=eval_mode,
                  start_radius=start_radius)
    x = _working_precision(x.detach())
    found = run.stopped_at >= 0
    x_boundary = run.x_adv.clone()
    forward_samples = run.forward_samples
    idx = found.nonzero().flatten()
    if idx.numel() > 0:
        low, high = run.x_before_stop[idx], run.x_adv[idx]
        y_found = select(y, idx)
        with attack_mode(model, eval_mode=eval_mode), torch.no_grad():
            for _ in range(binary_steps):
                mid = (low + high) / 2
                ok = is_correct(model(mid), y_found).bool().to(x.device)
                forward_samples += idx.numel()
                ok_b = ok.view(-1, *([1] * (x.dim() - 1)))
                low = torch.where(ok_b, mid, low)
                high = torch.where(ok_b, high, mid)
        x_boundary[idx] = low if boundary == "last_correct" else (low + high) / 2
    distance = per_sample_norm(x_boundary - x, check_norm(norm))
    return BoundaryResult(x_boundary, found, distance, run.stopped_at, forward_samples,
                          run.backward_samples)
