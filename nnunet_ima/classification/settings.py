"""The paper's per-dataset settings (METHOD section 7) and the run configuration."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

from nnunet_ima.classification.datasets import DATASETS, FASHION_MNIST_DEFAULT_ROOT, MOONS_NOISE
from nnunet_ima.classification.models import MODELS
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.declared import (METADATA_KEY, Choice, Count, FlatKeys, Integer, InvalidSetting,
                                 OpenUnitInterval, Text, UnitInterval, declaration,
                                 field_default, setting)
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


@dataclass(frozen=True)
class Number:
    """A finite number > ``minimum`` (``strict``) or >= it; with ``integer`` a whole one.
    ``words`` replaces what the message calls it (``a number``, ``an integer``)."""

    minimum: float
    strict: bool = False
    integer: bool = False
    words: Optional[str] = None
    value_type: type = float

    def check(self, name: str, value: Any) -> None:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        if ok and self.integer:
            ok = float(value).is_integer()
        if ok:
            ok = value > self.minimum if self.strict else value >= self.minimum
        if not ok:
            kind = self.words if self.words is not None else \
                ("an integer" if self.integer else "a number")
            relation = ">" if self.strict else ">="
            raise InvalidSetting(name, " ".join(filter(None, (
                "must be", kind, f"{relation} {self.minimum:g}, got {value!r}"))))


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


def _method_of(name: str) -> Optional[str]:
    """The method that alone reads field ``name`` (``trades_beta``: ``trades``), else ``None``."""
    prefix = name.split("_", 1)[0]
    return prefix if prefix in METHODS and prefix != name else None


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

    dataset: str = setting(help="the dataset to train on", rule=Choice(DATASETS))
    model: str = setting(help="the network", rule=Choice(tuple(sorted(MODELS))))
    method: str = setting(help="the training method", rule=Choice(METHODS))
    epochs: int = setting(help="training epochs", rule=Count(1))
    batch_size: int = setting(help="training batch size", rule=Count(1))
    lr: float = setting(1e-3, help="Adam learning rate", rule=Number(0, strict=True))
    seed: int = setting(0, help="initialisation, sample order, attack starts", rule=Integer())
    data_seed: int = setting(0, help="validation hold-out, COVID-19 split and Moons points",
                             rule=Integer())
    attack: AttackConfig = AttackConfig()
    eps: Optional[float] = setting(
        None, rule=Number(0, strict=True), optional=True,
        help="adv: the fixed PGD budget (required); trades, mma (its d_max), ddn (its max "
             "norm), fat, gairat: the training budget (default: the dataset's eps_max, as in "
             "the paper's comparison)")
    ima: Optional[IMAConfig] = None
    max_train: Optional[int] = setting(None, help="train on the first N training samples only",
                                       rule=Count(1), optional=True)
    data_root: Optional[str] = setting(
        None, rule=Text(), optional=True,
        help=f"dataset folder (fashion-mnist: default {FASHION_MNIST_DEFAULT_ROOT}; svhn, "
             f"cifar10, covid-ct: required)")
    moons_noise: float = setting(MOONS_NOISE, help="make_moons noise",
                                 rule=Number(0, words=""))
    trades_beta: float = setting(6.0, help="trades: weight of the KL term",
                                 rule=Number(0, strict=True))
    mma_clean_weight: float = setting(
        1 / 3, help="mma: weight of the whole batch's clean loss (default 1/3)",
        rule=UnitInterval())
    mma_binary_steps: int = setting(
        field_default(IMAConfig, "binary_steps"), rule=declaration(IMAConfig, "binary_steps").rule,
        help="mma: bisection steps of the margin search (written as binary_steps)")
    ddn_steps: int = setting(100, help="ddn: DDN iterations", rule=Count(1))
    ddn_gamma: float = setting(0.05, help="ddn: norm change per iteration",
                               rule=OpenUnitInterval())
    gairat_lambda: float = setting(-1.0, help="gairat: lambda of the weight function",
                                   rule=Number(-math.inf, strict=True))
    gairat_begin_epoch: Optional[int] = setting(
        None, help="gairat: first epoch (0-based) with reweighting (default: half the epochs)",
        rule=Count(0), optional=True)

    def __post_init__(self):
        FLAT_KEYS.check_parts(self, optional=("ima",))

    def validate(self) -> "TrainConfig":
        """Check what the parts cannot check alone: the own fields by their declared rules (a
        field of one method, ``<method>_...``, only in a run of that method), and what each
        method needs; returns ``self``.

        Raises:
            InvalidSetting: named by the flat key at fault (the ``config.json`` key), other keys
                referred to as ``{key}`` (a command line spells them as its options).
        """
        shared, mma = _SHARED_BISECTION
        for f in fields(self):
            declared = f.metadata.get(METADATA_KEY)
            if declared is None or _method_of(f.name) not in (None, self.method):
                continue
            try:
                declared.check(f.name, getattr(self, f.name))
            except InvalidSetting as e:  # MMA's bisection steps are binary_steps in the file
                raise e.renamed(lambda name: shared if name == mma else name) from None
        if self.method == "adv" and self.eps is None:
            raise InvalidSetting("method", "adv needs {eps}, the budget of its PGD attack "
                                           "(e.g. {eps} 0.3 for moons)")
        if self.method in BASELINE_METHODS and self.eps is None:
            raise InvalidSetting("method", f"{self.method} needs {{eps}}, its training budget")
        if self.method == "ddn" and self.attack.norm != "l2":
            raise InvalidSetting("method", "ddn is an L2 method (DDN searches minimal L2 "
                                           "perturbations); use {norm} l2")
        if self.method == "gairat" and self.attack.steps < 2:
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
