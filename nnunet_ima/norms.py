"""Per-sample vector norms, gradient normalisation, projections and random starts.

Every function treats dimension 0 as the batch and everything else (``C x H x W`` for an
image or a 2D slice, ``C x D x H x W`` for a 3D volume, ``D`` for a feature vector) as one
sample vector: a volume's norm, projection and random start are the whole volume's. ``eps`` is always a
``(B,)`` tensor here; :func:`as_eps_tensor` turns a scalar into one.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

NORMS = ("l2", "linf")

# Guards divisions by a zero-length vector (a zero gradient or a zero perturbation).
_TINY = 1e-12


def check_norm(norm: str) -> str:
    """Return ``norm`` lower-cased, or raise ``ValueError`` when it is not ``l2`` / ``linf``."""
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm.lower()


def per_sample_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` so that it multiplies a ``(B, ...)`` tensor per sample."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def as_eps_tensor(eps: Union[float, Sequence[float], torch.Tensor], x: torch.Tensor,
                  name: str = "eps") -> torch.Tensor:
    """Turn a scalar, list or tensor budget into a ``(B,)`` tensor on ``x``'s device and dtype.

    Raises ``ValueError`` (naming ``name``) for a wrong shape, a negative or a non-finite value.
    """
    batch = x.shape[0]
    t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(batch).clone()
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or a ({batch},) tensor matching the batch, "
                         f"got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0, got a minimum of {t.min().item():g}")
    return t


def per_sample_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """``(B, ...)`` -> ``(B,)``: the L2 or Linf norm of each sample vector."""
    flat = v.reshape(v.shape[0], -1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    return flat.abs().amax(dim=1)


def steepest_ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """``h(g)`` of PGD: the unit-L2 gradient per sample, or ``sign(g)`` for Linf. Shape kept."""
    if norm == "l2":
        length = per_sample_norm(grad, "l2").clamp_min(_TINY)
        return grad / per_sample_view(length, grad)
    return grad.sign()


def project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project each perturbation ``delta[i]`` onto the ball ``||.|| <= eps[i]``. Shape kept."""
    if norm == "l2":
        length = per_sample_norm(delta, "l2")
        factor = torch.where(length > eps, eps / length.clamp_min(_TINY), torch.ones_like(length))
        return delta * per_sample_view(factor, delta)
    bound = per_sample_view(eps, delta)
    return torch.maximum(torch.minimum(delta, bound), -bound)


def random_in_ball(like: torch.Tensor, eps: torch.Tensor, norm: str,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random perturbation with ``||xi[i]|| <= eps[i]``, shaped like ``like`` ``(B, ...)``.

    L2: a Gaussian direction scaled to a radius drawn uniformly from ``[0, eps]`` (the same
    law as torchattacks' PGDL2; a volume-uniform radius would put every start on the sphere
    in high dimension). Linf: uniform in the cube ``[-eps, eps]``.
    """
    if norm == "l2":
        direction = torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu")
        direction = direction.to(like.device)
        direction = direction / per_sample_view(per_sample_norm(direction, "l2").clamp_min(_TINY), like)
        radius = torch.rand(like.shape[0], generator=generator, dtype=like.dtype, device="cpu")
        return direction * per_sample_view(radius.to(like.device) * eps, like)
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    return (2 * u - 1) * per_sample_view(eps, like)


def random_on_sphere(like: torch.Tensor, radius: torch.Tensor, norm: str,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random perturbation with ``||xi[i]|| == radius[i]`` exactly, shaped like ``like``.

    L2: a Gaussian direction scaled to ``radius``. Linf: uniform in the cube, then scaled so that
    its largest coordinate is ``radius`` (a point on the cube's surface).
    """
    if norm == "l2":
        direction = torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu")
    else:
        direction = 2 * torch.rand(like.shape, generator=generator, dtype=like.dtype,
                                   device="cpu") - 1
    direction = direction.to(like.device)
    direction = direction / per_sample_view(per_sample_norm(direction, norm).clamp_min(_TINY), like)
    return direction * per_sample_view(radius, like)


def clamp_to_range(x: torch.Tensor, clamp: Optional[tuple]) -> torch.Tensor:
    """Clamp to ``(low, high)``; each bound is a float or a per-sample ``(B,)`` tensor."""
    if clamp is None:
        return x
    low, high = clamp
    if isinstance(low, torch.Tensor) and low.dim() == 1:
        low = per_sample_view(low.to(x), x)
    if isinstance(high, torch.Tensor) and high.dim() == 1:
        high = per_sample_view(high.to(x), x)
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        low = torch.as_tensor(low, dtype=x.dtype, device=x.device)
        high = torch.as_tensor(high, dtype=x.dtype, device=x.device)
        return torch.maximum(torch.minimum(x, high), low)
    return x.clamp(low, high)
