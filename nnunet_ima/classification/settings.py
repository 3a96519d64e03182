"""The paper's per-dataset settings (METHOD section 7) and the run configuration."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional

from nnunet_ima.classification.datasets import DATASETS, MOONS_NOISE
from nnunet_ima.config import IMAConfig
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
        raise UserInputError(f"{name} must be {kind} {relation} {minimum:g}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything that defines a classification run; written to ``config.json``.

    Two runs with equal configs (and the same software) produce the same model; a run folder
    is resumed only with an equal config. ``seed`` drives initialisation, sample order and the
    attacks' random starts; ``data_seed`` the data splits (and the Moons points).
    """

    dataset: str
    model: str
    method: str
    epochs: int
    batch_size: int
    lr: float = 1e-3
    seed: int = 0
    data_seed: int = 0
    norm: str = "l2"
    pgd_steps: int = 20
    pgd_alpha: float = 4.0
    eps: Optional[float] = None          # adv and the baselines: the fixed budget
    eps_max: Optional[float] = None      # ima
    delta: Optional[float] = None
    beta: float = 0.5
    binary_steps: int = 10
    margin_update: str = "average"
    on_clean_wrong: str = "shrink"
    clip_min: str = "zero"
    max_train: Optional[int] = None
    data_root: Optional[str] = None
    moons_noise: float = MOONS_NOISE
    trades_beta: float = 6.0
    mma_clean_weight: float = 1 / 3
    ddn_steps: int = 100
    ddn_gamma: float = 0.05
    gairat_lambda: float = -1.0
    gairat_begin_epoch: Optional[int] = None   # None: epochs // 2

    def validate(self) -> "TrainConfig":
        """Raise :class:`UserInputError` naming the option at fault; returns ``self``."""
        if self.dataset not in DATASETS:
            raise UserInputError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise UserInputError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.norm not in ("l2", "linf"):
            raise UserInputError(f"--norm must be l2 or linf, got {self.norm!r}")
        _number("--epochs", self.epochs, 1, strict=False, integer=True)
        _number("--batch-size", self.batch_size, 1, strict=False, integer=True)
        _number("--lr", self.lr, 0, strict=True)
        _number("--pgd-steps", self.pgd_steps, 1, strict=False, integer=True)
        _number("--pgd-alpha", self.pgd_alpha, 0, strict=True)
        if self.max_train is not None:
            _number("--max-train", self.max_train, 1, strict=False, integer=True)
        if self.method == "adv":
            if self.eps is None:
                raise UserInputError("--method adv needs --eps, the budget of its PGD attack "
                                     "(e.g. --eps 0.3 for moons)")
            _number("--eps", self.eps, 0, strict=True)
        if self.method in BASELINE_METHODS:
            if self.eps is None:
                raise UserInputError(f"--method {self.method} needs --eps, its training budget")
            _number("--eps", self.eps, 0, strict=True)
        if self.method == "trades":
            _number("--trades-beta", self.trades_beta, 0, strict=True)
        if self.method == "mma" and not 0 <= self.mma_clean_weight <= 1:
            raise UserInputError(f"--mma-clean-weight must lie in [0, 1], got {self.mma_clean_weight!r}")
        if self.method == "ddn":
            if self.norm != "l2":
                raise UserInputError("--method ddn is an L2 method (DDN searches minimal L2 "
                                     "perturbations); use --norm l2")
            _number("--ddn-steps", self.ddn_steps, 1, strict=False, integer=True)
            if not 0 < self.ddn_gamma < 1:
                raise UserInputError(f"--ddn-gamma must lie in (0, 1), got {self.ddn_gamma!r}")
        if self.method == "gairat":
            _number("--gairat-lambda", self.gairat_lambda, -math.inf, strict=True)
            if self.gairat_begin_epoch is not None:
                _number("--gairat-begin-epoch", self.gairat_begin_epoch, 0, strict=False,
                        integer=True)
            if self.pgd_steps < 2:
                raise UserInputError("--method gairat needs --pgd-steps >= 2 (its geometry "
                                     "values count PGD steps)")
        if self.method == "ima":
            if self.eps_max is None:
                raise UserInputError("--method ima needs --eps-max")
            try:
                self.ima_config()
            except ValueError as e:
                raise UserInputError(f"IMA option: {e} (see --eps-max, --delta, --beta, "
                                     f"--binary-steps)") from None
        return self

    def ima_config(self) -> IMAConfig:
        return IMAConfig(eps_max=self.eps_max, delta=self.delta, beta=self.beta,
                         binary_steps=self.binary_steps, margin_update=self.margin_update,
                         on_clean_wrong=self.on_clean_wrong, clip_min=self.clip_min)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"config.json has unknown keys {unknown}: written by another "
                                 f"version of nnunet-ima?")
        return cls(**values)

    def differences(self, other: "TrainConfig") -> List[str]:
        """``["key: self value != other value", ...]`` for every differing field."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]
