"""Frozen, validated settings of the attacks and of IMA, serialisable to and from JSON dicts.

Every field is declared once (:func:`nnunet_ima.declared.setting`): its default, help text and
rule live in the field, ``__post_init__`` validates from them, and the command lines and the
composing settings (``nnunet_ima.nnunet.settings.TrainerSettings``,
``nnunet_ima.classification.settings.TrainConfig``) build on them instead of repeating them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Type, TypeVar

from nnunet_ima.attacks import BOUNDARY_POINTS, NAMED_LOSSES
from nnunet_ima.declared import (Choice, Count, Flag, InvalidSetting, Positive, UnitInterval,
                                 setting, validate_declared)
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


@dataclass(frozen=True)
class AttackConfig:
    """PGD settings: ``steps`` iterations of size ``alpha * eps / steps`` in ``norm``."""

    norm: str = setting("l2", help="attack norm", rule=Choice(NORMS))
    steps: int = setting(20, help="PGD iterations", rule=Count(1))
    alpha: float = setting(4.0, help="PGD step = alpha * eps / steps (4: the ball is swept 4 "
                                     "times)", rule=Positive())
    random_start: bool = setting(True, help="start PGD at a random point of the ball (else at "
                                            "the input)", rule=Flag())
    loss: str = setting("ce", help="the per-sample loss PGD maximises (cross-entropy or the "
                                   "margin loss)", rule=Choice(tuple(NAMED_LOSSES)))

    def __post_init__(self):
        validate_declared(self)

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

    eps_max: float = setting(help="the largest margin", rule=Positive())
    delta: Optional[float] = setting(
        None, help="margin expansion step (default: eps_max / growth epochs)", rule=Positive(),
        optional=True)
    beta: float = setting(0.5, help="weight of the boundary-point loss", rule=UnitInterval())
    binary_steps: int = setting(10, help="bisection steps of BPGD", rule=Count(0))
    margin_update: str = setting(
        "average", help="a crossed sample's margin becomes (d + E) / 2 (average) or d (replace)",
        rule=Choice(SHRINK_RULES))
    on_clean_wrong: str = setting(
        "shrink", help="a misclassified sample's margin shrinks as if crossed at distance 0, or "
                       "is reset to delta", rule=Choice(CLEAN_WRONG_POLICIES))
    clip_min: str = setting("zero", help="clip margins to [0, eps_max] or [delta, eps_max]",
                            rule=Choice(CLIP_MINIMA))
    boundary: str = setting(
        "last_correct", help="the point BPGD returns: the correct end of the last bisection "
                             "bracket, or its midpoint", rule=Choice(BOUNDARY_POINTS))
    growth_epochs: Optional[int] = setting(
        None, help="epochs for a margin to grow from 0 to eps_max, so that delta defaults to "
                   "eps_max / growth epochs (default: the number of training epochs)",
        rule=Count(1), optional=True)
    repeat_draws: str = setting(
        "cross_shrinks", help="a sample recorded several times in one epoch: shrinks if any "
                              "record crossed (cross_shrinks), expands if any did not "
                              "(miss_expands)", rule=Choice(REPEAT_DRAW_RULES))

    def __post_init__(self):
        validate_declared(self)
        if self.delta is not None and self.delta > self.eps_max:
            raise InvalidSetting("delta", f"({self.delta}) must not exceed {{eps_max}} "
                                          f"({self.eps_max})")

    def resolved_delta(self, num_epochs: int) -> float:
        """``delta``, or ``eps_max / (growth_epochs or num_epochs)`` when unset."""
        if self.delta is not None:
            return float(self.delta)
        Count(1).check("num_epochs", num_epochs)
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
