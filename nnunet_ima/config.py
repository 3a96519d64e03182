"""Frozen, validated settings of the attacks and of IMA, serialisable to and from JSON dicts."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Type, TypeVar

from nnunet_ima.attacks import BOUNDARY_POINTS, NAMED_LOSSES
from nnunet_ima.margins import (CLEAN_WRONG_POLICIES, CLIP_MINIMA, REPEAT_DRAW_RULES, SHRINK_RULES,
                                MarginStore)
from nnunet_ima.norms import NORMS

T = TypeVar("T")


def from_dict(cls: Type[T], values: Dict[str, Any]) -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys are a ``ValueError`` naming them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; known options: {sorted(known)}")
    return cls(**values)


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _count(name: str, value: Any, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _choice(name: str, value: Any, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


@dataclass(frozen=True)
class AttackConfig:
    """PGD settings: ``steps`` iterations of size ``alpha * eps / steps`` in ``norm``."""

    norm: str = "l2"
    steps: int = 20
    alpha: float = 4.0
    random_start: bool = True
    loss: str = "ce"

    def __post_init__(self):
        _choice("norm", self.norm, NORMS)
        _count("steps", self.steps, 1)
        _positive("alpha", self.alpha)
        _choice("loss", self.loss, NAMED_LOSSES)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "AttackConfig":
        return from_dict(cls, values)


@dataclass(frozen=True)
class IMAConfig:
    """IMA settings (METHOD sections 3-4).

    ``delta=None`` means ``eps_max / growth_epochs``, and ``growth_epochs=None`` the number of
    training epochs (the paper as printed; the authors' segmentation code used 10), resolved by
    :meth:`resolved_delta`. ``margin_update`` is the shrink rule (``average`` / ``replace``),
    ``on_clean_wrong`` the policy for clean-misclassified samples (``shrink`` / ``reset``),
    ``clip_min`` the lower clip (``zero`` / ``delta``), ``boundary`` the point BPGD returns
    (``last_correct`` / ``midpoint``), ``repeat_draws`` the rule for a sample drawn several times
    in one epoch (``cross_shrinks`` / ``miss_expands``, see :mod:`nnunet_ima.margins`).
    """

    eps_max: float
    delta: Optional[float] = None
    beta: float = 0.5
    binary_steps: int = 10
    margin_update: str = "average"
    on_clean_wrong: str = "shrink"
    clip_min: str = "zero"
    boundary: str = "last_correct"
    growth_epochs: Optional[int] = None
    repeat_draws: str = "cross_shrinks"

    def __post_init__(self):
        _positive("eps_max", self.eps_max)
        if self.growth_epochs is not None:
            _count("growth_epochs", self.growth_epochs, 1)
        if self.delta is not None:
            _positive("delta", self.delta)
            if self.delta > self.eps_max:
                raise ValueError(f"delta ({self.delta}) must not exceed eps_max ({self.eps_max})")
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta <= 1):
            raise ValueError(f"beta must be in [0, 1], got {self.beta!r}")
        _count("binary_steps", self.binary_steps, 0)
        _choice("margin_update", self.margin_update, SHRINK_RULES)
        _choice("on_clean_wrong", self.on_clean_wrong, CLEAN_WRONG_POLICIES)
        _choice("clip_min", self.clip_min, CLIP_MINIMA)
        _choice("boundary", self.boundary, BOUNDARY_POINTS)
        _choice("repeat_draws", self.repeat_draws, REPEAT_DRAW_RULES)

    def resolved_delta(self, num_epochs: int) -> float:
        """``delta``, or ``eps_max / (growth_epochs or num_epochs)`` when unset."""
        if self.delta is not None:
            return float(self.delta)
        _count("num_epochs", num_epochs, 1)
        return float(self.eps_max) / (self.growth_epochs or num_epochs)

    def make_margin_store(self, num_epochs: int) -> MarginStore:
        """A fresh :class:`MarginStore` with these settings (initial margin ``delta``)."""
        return MarginStore(eps_max=float(self.eps_max), delta=self.resolved_delta(num_epochs),
                           shrink=self.margin_update, on_clean_wrong=self.on_clean_wrong,
                           clip_min=self.clip_min, repeat_draws=self.repeat_draws)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "IMAConfig":
        return from_dict(cls, values)
