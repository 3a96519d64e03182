"""The paper's per-dataset settings (METHOD section 7) and the run configuration."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from nnunet_ima.classification.datasets import DATASETS, MOONS_NOISE
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.declared import FlatKeys, InvalidSetting, declaration, field_default
from nnunet_ima.errors import UserInputError

METHODS = ("ce", "adv", "ima", "trades", "mma", "ddn", "fat", "gairat")
BASELINE_METHODS = ("trades", "mma", "ddn", "fat", "gairat")
"""Methods trained at the fixed budget ``eps`` (default: the dataset's ``eps_max``)."""


@dataclass(frozen=True)
class PaperSetting:
    """``eps_max`` of IMA, epochs, batch size and the L2 noise levels of the evaluation."""

    eps_max: float
    epochs: int
    batch_size: int
    noise: List[float]


PAPER_SETTINGS: Dict[str, PaperSetting] = {
    "moons": PaperSetting(0.3, 30, 128, [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]),
    "fashion-mnist": PaperSetting(5.0, 60, 128, [0.0, 0.5, 1.0, 2.0, 3.0]),
    "svhn": PaperSetting(2.0, 60, 128, [0.0, 0.1, 0.25, 0.5, 1.0]),
    "cifar10": PaperSetting(1.5, 100, 128, [0.0, 0.5, 1.0, 1.5]),
    "covid-ct": PaperSetting(30.0, 40, 32, [0.0, 1.0, 3.0, 5.0, 10.0, 30.0]),
    # Not in the paper: 8x8 images, whose L2 norms are a third of Fashion-MNIST's 28x28 ones.
    "digits": PaperSetting(2.0, 30, 128, [0.0, 0.5, 1.0, 1.5, 2.0]),
}
assert set(PAPER_SETTINGS) == set(DATASETS)


def _number(name: str, value: Any, minimum: float, strict: bool, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        relation = ">" if strict else ">="
        kind = "an integer" if integer else "a number"
        raise InvalidSetting(name, f"must be {kind} {relation} {minimum:g}, got {value!r}")


# The flat keys of config.json that are fields of the attack and IMA parts; the others are
# TrainConfig's own fields. The attack's random start and loss are no keys: training always
# starts PGD at random and maximises the cross-entropy.
FLAT_KEYS = FlatKeys(
    parts={"attack": AttackConfig, "ima": IMAConfig},
    keys={"norm": ("attack", "norm"), "pgd_steps": ("attack", "steps"),
          "pgd_alpha": ("attack", "alpha"),
          "eps_max": ("ima", "eps_max"), "delta": ("ima", "delta"), "beta": ("ima", "beta"),
          "binary_steps": ("ima", "binary_steps"), "margin_update": ("ima", "margin_update"),
          "on_clean_wrong": ("ima", "on_clean_wrong"), "clip_min": ("ima", "clip_min"),
          "boundary": ("ima", "boundary"), "repeat_draws": ("ima", "repeat_draws"),
          "growth_epochs": ("ima", "growth_epochs")})
# MMA's margin search bisects like IMA's BPGD, with the same key: binary_steps is
# ima.binary_steps in a run with IMA settings and mma_binary_steps in the others.
_SHARED_BISECTION = ("binary_steps", "mma_binary_steps")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a classification run; written to ``config.json``.

    Two runs with equal configs (and the same software) produce the same model; a run folder
    is resumed only with an equal config. ``seed`` drives initialisation, sample order and the
    attacks' random starts; ``data_seed`` the data splits (and the Moons points).

    ``attack``: the training attacks' norm, steps and step size (every method's PGD). ``ima``:
    IMA's settings, present exactly when ``eps_max`` is given (``method="ima"`` needs them).
    ``eps``: the fixed budget of adv and the baselines. ``mma_binary_steps``: the bisection
    steps of MMA's margin search (its ``d_max`` is ``eps``).

    ``config.json`` is flat (:meth:`to_dict`, :meth:`from_dict`): the own fields and the
    :data:`FLAT_KEYS` of the parts, as written before the parts existed; the keys that came
    with them (``boundary``, ``repeat_draws``, ``growth_epochs``) take their defaults when a
    file lacks them. Without ``ima`` its keys are written at their defaults (``eps_max``
    ``null``), and ``binary_steps`` is ``mma_binary_steps``.
    """

    dataset: str
    model: str
    method: str
    epochs: int
    batch_size: int
    lr: float = 1e-3
    seed: int = 0
    data_seed: int = 0
    attack: AttackConfig = AttackConfig()
    eps: Optional[float] = None          # adv and the baselines: the fixed budget
    ima: Optional[IMAConfig] = None
    max_train: Optional[int] = None
    data_root: Optional[str] = None
    moons_noise: float = MOONS_NOISE
    trades_beta: float = 6.0
    mma_clean_weight: float = 1 / 3
    mma_binary_steps: int = field_default(IMAConfig, "binary_steps")
    ddn_steps: int = 100
    ddn_gamma: float = 0.05
    gairat_lambda: float = -1.0
    gairat_begin_epoch: Optional[int] = None   # None: epochs // 2

    def __post_init__(self):
        FLAT_KEYS.check_parts(self, optional=("ima",))

    def validate(self) -> "TrainConfig":
        """Check what the parts cannot check alone (ranges of the own fields, what each method
        needs); returns ``self``.

        Raises:
            InvalidSetting: named by the flat key at fault (the ``config.json`` key), other keys
                referred to as ``{key}`` (a command line spells them as its options).
        """
        if self.dataset not in DATASETS:
            raise InvalidSetting("dataset", f"must be one of {', '.join(DATASETS)}, "
                                            f"got {self.dataset!r}")
        if self.method not in METHODS:
            raise InvalidSetting("method", f"must be one of {', '.join(METHODS)}, "
                                           f"got {self.method!r}")
        _number("epochs", self.epochs, 1, strict=False, integer=True)
        _number("batch_size", self.batch_size, 1, strict=False, integer=True)
        _number("lr", self.lr, 0, strict=True)
        if self.max_train is not None:
            _number("max_train", self.max_train, 1, strict=False, integer=True)
        if self.method == "adv":
            if self.eps is None:
                raise InvalidSetting("method", "adv needs {eps}, the budget of its PGD attack "
                                               "(e.g. {eps} 0.3 for moons)")
            _number("eps", self.eps, 0, strict=True)
        if self.method in BASELINE_METHODS:
            if self.eps is None:
                raise InvalidSetting("method", f"{self.method} needs {{eps}}, its training budget")
            _number("eps", self.eps, 0, strict=True)
        if self.method == "trades":
            _number("trades_beta", self.trades_beta, 0, strict=True)
        if self.method == "mma":
            if not 0 <= self.mma_clean_weight <= 1:
                raise InvalidSetting("mma_clean_weight", f"must lie in [0, 1], "
                                                         f"got {self.mma_clean_weight!r}")
            declaration(IMAConfig, "binary_steps").check("binary_steps", self.mma_binary_steps)
        if self.method == "ddn":
            if self.attack.norm != "l2":
                raise InvalidSetting("method", "ddn is an L2 method (DDN searches minimal L2 "
                                               "perturbations); use {norm} l2")
            _number("ddn_steps", self.ddn_steps, 1, strict=False, integer=True)
            if not 0 < self.ddn_gamma < 1:
                raise InvalidSetting("ddn_gamma", f"must lie in (0, 1), got {self.ddn_gamma!r}")
        if self.method == "gairat":
            _number("gairat_lambda", self.gairat_lambda, -math.inf, strict=True)
            if self.gairat_begin_epoch is not None:
                _number("gairat_begin_epoch", self.gairat_begin_epoch, 0, strict=False,
                        integer=True)
            if self.attack.steps < 2:
                raise InvalidSetting("method", "gairat needs {pgd_steps} >= 2 (its geometry "
                                               "values count PGD steps)")
        if self.method == "ima" and self.ima is None:
            raise InvalidSetting("method", "ima needs {eps_max}")
        return self

    # ------------------------------------------------------------------------- JSON
    def to_dict(self) -> Dict[str, Any]:
        """The flat ``config.json`` object (see the class docstring)."""
        flat = FLAT_KEYS.flatten(self)
        shared, mma = _SHARED_BISECTION
        bisection = flat.pop(mma)
        if self.ima is None:
            flat[shared] = bisection
        return flat

    @classmethod
    def from_flat(cls, values: Dict[str, Any]) -> "TrainConfig":
        """The config of flat keys ``values`` (those of :meth:`to_dict`; a missing key takes
        its default). The IMA keys of a run without ``eps_max`` are not part of its config,
        but ``binary_steps`` is then MMA's.

        Raises:
            InvalidSetting: an attack or IMA value out of range, named by its flat key.
            TypeError: a key that is neither a field nor a flat key, or a required one missing.
        """
        own, parts = FLAT_KEYS.split(values)
        shared, mma = _SHARED_BISECTION
        if mma in own:
            raise TypeError(f"{mma} is written as {shared}")
        ima = parts["ima"]
        own["attack"] = FLAT_KEYS.build_part("attack", parts["attack"])
        if ima.get("eps_max") is not None:
            own["ima"] = FLAT_KEYS.build_part("ima", ima)
        elif shared in values:
            own[mma] = values[shared]
        return cls(**own)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """The config of a ``config.json`` (or of a checkpoint): its flat keys, older files'
        too (a key added since takes its default).

        Raises:
            UserInputError: unknown keys (a file of another version) or a value out of range.
        """
        known = set(FLAT_KEYS.known(cls)) - {_SHARED_BISECTION[1]}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"config.json has unknown keys {unknown}: written by another "
                                 f"version of nnunet-ima?")
        try:
            return cls.from_flat(values)
        except InvalidSetting as e:
            raise UserInputError(f"config.json: {e}") from None

    def differences(self, other: "TrainConfig") -> List[str]:
        """``["key: self value != other value", ...]`` for every differing flat key."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]
