"""The attacks that ``nnunet-ima-classify eval`` can run, behind one interface.

Every attack is a function ``fooled(model, x, y, noise, *, norm, steps, clamp, seed, settings)
-> (B,) bool``: ``True`` where the attack found a point in the ``noise`` ball (and in the valid
input range) that the model misclassifies. The prediction at that point is always recomputed
here with the model itself, so no attack's own bookkeeping can mark a sample as fooled.

* ``ce``, ``margin``: our 100-step PGD (step ``noise / 10``, random start) on the cross-entropy
  or the margin loss; a fooled sample leaves the loop.
* ``apgd-ce``, ``apgd-dlr``: AutoAttack's white-box APGD (Croce & Hein 2020) through the
  maintained torchattacks package, on the cross-entropy or the DLR loss (DLR needs >= 3
  classes). torchattacks clips its iterates to ``[0, 1]``; other input ranges are mapped there
  by an exact isotropic affine change of variables (:class:`UnitBox`).
* ``spsa``: the gradient-free SPSA of Uesato et al. 2018 (:mod:`.spsa`) on the margin loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_ima.attacks import pgd
from nnunet_ima.classification.spsa import SPSASettings, spsa
from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation.attacks import APGD_RHO  # torchattacks gets the evaluator's APGD rule
from nnunet_ima.model_mode import attack_mode
from nnunet_ima.norms import clamp_to_range, project

TORCHATTACKS_INSTALL = "pip install --no-deps torchattacks==3.5.1"


@dataclass(frozen=True)
class StrongAttackSettings:
    """Settings of the attacks beyond PGD's ``steps`` (APGD runs ``steps`` iterations too)."""

    apgd_restarts: int = 1
    spsa: SPSASettings = field(default_factory=SPSASettings)

    def validate(self) -> "StrongAttackSettings":
        if not isinstance(self.apgd_restarts, int) or self.apgd_restarts < 1:
            raise ValueError(f"APGD restarts must be an integer >= 1, got {self.apgd_restarts!r}")
        self.spsa.validate()
        return self


FooledFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack: its table label, its group and what it needs."""

    label: str
    fooled: FooledFn
    group: str                 # "pgd" attacks are pooled into one "100-PGD (ce, margin)" entry
    min_classes: int = 2
    needs_torchattacks: bool = False


@torch.no_grad()
def _wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) != y


def _misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=1) != y


def _inside(x: torch.Tensor, x_adv: torch.Tensor, noise: float, norm: str,
            clamp: Optional[Tuple[float, float]]) -> torch.Tensor:
    """``x_adv`` pulled into the ball and the range: removes rounding of foreign code only."""
    eps = torch.full((x.shape[0],), float(noise), dtype=x.dtype, device=x.device)
    return clamp_to_range(x + project(x_adv.to(x.dtype) - x, eps, norm), clamp)


# ------------------------------------------------------------------------------------- PGD
def pgd_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, *, norm: str,
               steps: int, clamp: Optional[Tuple[float, float]], seed: int,
               settings: Optional[StrongAttackSettings] = None, loss: str = "ce") -> torch.Tensor:
    """``(B,)`` bool: ``steps``-step PGD (step ``noise / 10``, random start) on ``loss`` fools."""
    if noise == 0:
        return _wrong(model, x, y)
    generator = torch.Generator().manual_seed(seed)
    x_adv = pgd(model, x, y, noise, norm=norm, steps=steps, alpha=steps / 10, loss=loss,
                clamp=clamp, stop_if=_misclassified, generator=generator)
    return _wrong(model, x_adv, y)


# ------------------------------------------------------------------------------------ APGD
def require_torchattacks():
    """The torchattacks module, or a :class:`UserInputError` saying how to install it."""
    try:
        import torchattacks
    except ImportError:
        raise UserInputError(f"the APGD attacks need the torchattacks package: "
                             f"`{TORCHATTACKS_INSTALL}`") from None
    return torchattacks


@dataclass
class UnitBox:
    """The isotropic affine map ``u = (x - low) / scale`` that puts every point of the attack's
    reach inside ``[0, 1]`` (torchattacks clips there).

    ``low``: ``(1, ...)`` per-coordinate offset; ``scale``: one number for every coordinate, so
    L2 and Linf distances both shrink by exactly ``scale`` and the budget becomes
    ``noise / scale``. ``identity`` (inputs already in ``[0, 1]``) changes nothing at all.
    Non-identity maps compute in float64, so ``x -> u -> x`` returns every float32 ``x``
    bit for bit.
    """

    low: torch.Tensor
    scale: float
    identity: bool
    shape: Tuple[int, ...]      # the model's sample shape; torchattacks needs (B, C, H, W)

    @staticmethod
    def for_batch(x: torch.Tensor, noise: float,
                  clamp: Optional[Tuple[float, float]]) -> "UnitBox":
        """The box of the batch ``x (B, ...)`` attacked with budget ``noise``.

        ``clamp = (0, 1)``: the identity. ``clamp = (lo, hi)``: ``[lo, hi]`` maps onto
        ``[0, 1]``, so torchattacks' clip is the valid range itself. ``clamp = None``
        (unbounded inputs): the box spans every coordinate of the batch widened by ``noise``
        and a 5 % pad on each side, so no point of any ball touches ``0`` or ``1`` and the clip
        never binds.
        """
        shape = tuple(x.shape[1:])
        if clamp is not None and tuple(float(c) for c in clamp) == (0.0, 1.0):
            return UnitBox(torch.zeros(1, *shape, dtype=x.dtype, device=x.device), 1.0, True, shape)
        if clamp is not None:
            lo, hi = float(clamp[0]), float(clamp[1])
            low = torch.full((1, *shape), lo, dtype=torch.float64, device=x.device)
            return UnitBox(low, hi - lo, False, shape)
        xd = x.detach().double()
        lo = xd.amin(dim=0, keepdim=True)
        hi = xd.amax(dim=0, keepdim=True)
        reach = float((hi - lo).max()) + 2 * noise
        pad = 0.05 * reach + 1e-6
        return UnitBox(lo - noise - pad, reach + 2 * pad, False, shape)

    def _as_image(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == 4 else t.reshape(t.shape[0], 1, 1, -1)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` model inputs -> ``(B, C, H, W)`` points of ``[0, 1]``."""
        if self.identity:
            return self._as_image(x)
        return self._as_image((x.double() - self.low) / self.scale)

    def from_unit(self, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The inverse map: ``(B, C, H, W)`` -> ``(B, ...)`` model inputs of ``dtype``."""
        u = u.reshape(u.shape[0], *self.shape)
        if self.identity:
            return u.to(dtype)
        return (u.double() * self.scale + self.low).to(dtype)


class UnitBoxModel(nn.Module):
    """``model`` seen through :class:`UnitBox`: ``forward(u) = model(box.from_unit(u))``."""

    def __init__(self, model: nn.Module, box: UnitBox, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.box = box
        self.dtype = dtype

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(self.box.from_unit(u, self.dtype))


def _rng_devices() -> list:
    # torchattacks reseeds the global generators; fork_rng puts them back afterwards.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def apgd_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, *, norm: str,
                steps: int, clamp: Optional[Tuple[float, float]], seed: int,
                settings: Optional[StrongAttackSettings] = None, loss: str = "ce") -> torch.Tensor:
    """``(B,)`` bool: torchattacks' APGD (``loss`` = ``"ce"`` / ``"dlr"``, ``steps`` iterations,
    ``rho = 0.75``, ``settings.apgd_restarts`` restarts) fools the sample.

    The global torch RNG state is left as it was (APGD reseeds it with ``seed``).
    """
    if noise == 0:
        return _wrong(model, x, y)
    torchattacks = require_torchattacks()
    settings = settings or StrongAttackSettings()
    box = UnitBox.for_batch(x, float(noise), clamp)
    wrapped = UnitBoxModel(model, box, x.dtype).eval()
    with attack_mode(model), torch.random.fork_rng(devices=_rng_devices()):
        attack = torchattacks.APGD(wrapped, norm="L2" if norm == "l2" else "Linf",
                                   eps=float(noise) / box.scale, steps=steps,
                                   n_restarts=settings.apgd_restarts, seed=seed, loss=loss,
                                   rho=APGD_RHO)
        u_adv = attack(box.to_unit(x), y)
    x_adv = _inside(x, box.from_unit(u_adv.detach(), x.dtype), noise, norm, clamp)
    return _wrong(model, x_adv, y)


# ------------------------------------------------------------------------------------ SPSA
def spsa_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, *, norm: str,
                steps: int, clamp: Optional[Tuple[float, float]], seed: int,
                settings: Optional[StrongAttackSettings] = None) -> torch.Tensor:
    """``(B,)`` bool: SPSA (``settings.spsa``; ``steps`` is PGD's and not used) fools."""
    if noise == 0:
        return _wrong(model, x, y)
    settings = settings or StrongAttackSettings()
    result = spsa(model, x, y, float(noise), norm=norm, settings=settings.spsa, clamp=clamp,
                  generator=torch.Generator().manual_seed(seed))
    return _wrong(model, _inside(x, result.x_adv, noise, norm, clamp), y)


def _with_loss(fn: FooledFn, loss: str) -> FooledFn:
    def fooled(*args, **kwargs):
        return fn(*args, loss=loss, **kwargs)
    fooled.__doc__ = fn.__doc__
    return fooled


ATTACKS: Dict[str, AttackSpec] = {
    "ce": AttackSpec("ce", _with_loss(pgd_fooled, "ce"), "pgd"),
    "margin": AttackSpec("margin", _with_loss(pgd_fooled, "margin"), "pgd"),
    "apgd-ce": AttackSpec("APGD-CE", _with_loss(apgd_fooled, "ce"), "apgd", 2, True),
    "apgd-dlr": AttackSpec("APGD-DLR", _with_loss(apgd_fooled, "dlr"), "apgd", 3, True),
    "spsa": AttackSpec("SPSA", spsa_fooled, "spsa"),
}
"""Attack name -> :class:`AttackSpec`, in table order. The registry order also fixes each
attack's seed offset, so adding an attack later never changes the others' results."""

PGD_ATTACKS = tuple(name for name, spec in ATTACKS.items() if spec.group == "pgd")


def check_attacks(attacks: Sequence[str], num_classes: int, where: str = "") -> None:
    """Raise :class:`UserInputError` before any work when an attack cannot run here."""
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise UserInputError(f"attacks must be a non-empty subset of {list(ATTACKS)}, "
                             f"got {list(attacks)}")
    for name in attacks:
        spec = ATTACKS[name]
        if num_classes < spec.min_classes:
            raise UserInputError(
                f"{name} needs at least {spec.min_classes} classes (the DLR loss divides by the "
                f"gap between the largest and the third-largest logit) but {where or 'the data'} "
                f"has {num_classes}; use apgd-ce and margin instead")
        if spec.needs_torchattacks:
            require_torchattacks()


def settings_record(attacks: Sequence[str], steps: int, settings: StrongAttackSettings) -> dict:
    """The settings of the attacks run, for the JSON report."""
    record = {}
    if any(ATTACKS[a].group == "pgd" for a in attacks):
        record["pgd"] = {"steps": steps, "step_size": "noise / 10", "random_start": True,
                         "losses": [a for a in attacks if ATTACKS[a].group == "pgd"]}
    if any(ATTACKS[a].group == "apgd" for a in attacks):
        import torchattacks
        record["apgd"] = {"package": f"torchattacks {getattr(torchattacks, '__version__', '?')}",
                          "steps": steps, "restarts": settings.apgd_restarts, "rho": APGD_RHO,
                          "losses": [a for a in attacks if ATTACKS[a].group == "apgd"]}
    if "spsa" in attacks:
        record["spsa"] = settings.spsa.to_dict()
    return record


def caption(attacks: Sequence[str], steps: int) -> str:
    """``"100-PGD (ce, margin), APGD-CE, SPSA"``: the attacks run, PGD losses pooled."""
    parts, pgd_losses = [], [a for a in ATTACKS if a in attacks and ATTACKS[a].group == "pgd"]
    for name in ATTACKS:
        if name not in attacks:
            continue
        if ATTACKS[name].group == "pgd":
            if name == pgd_losses[0]:
                parts.append(f"{steps}-PGD ({', '.join(pgd_losses)})")
        else:
            parts.append(ATTACKS[name].label)
    return ", ".join(parts)


__all__ = ["ATTACKS", "PGD_ATTACKS", "AttackSpec", "StrongAttackSettings", "SPSASettings",
           "UnitBox", "UnitBoxModel", "apgd_fooled", "pgd_fooled", "spsa_fooled", "caption",
           "check_attacks", "require_torchattacks", "settings_record"]
