"""The per-sample margin estimates of IMA and their once-per-epoch update (Algorithm 2).

A sample key is any hashable value: an ``int`` dataset index for classification, a
``(case_identifier, slice_index)`` tuple for nnU-Net 2D training.

Update rule applied by :meth:`MarginStore.end_epoch` to every key recorded during the epoch
(keys not recorded keep their margin):

* the key crossed the boundary (BPGD found a boundary point) -> **shrink** towards the
  distance: ``average`` rule ``E = (distance + E) / 2``, ``replace`` rule ``E = distance``;
* the key was misclassified / mis-segmented on the clean input -> ``shrink`` policy: shrink with
  distance 0 (``E = E / 2`` under the ``average`` rule, ``E = 0`` under ``replace``),
  ``reset`` policy: ``E = delta``;
* otherwise (never crossed within ``E``) -> **expand** ``E = E + delta``;
* then clip to ``[clip_min, eps_max]``.

A key recorded several times in one epoch (nnU-Net samples slices with replacement) is treated
by the ``repeat_draws`` rule. Under the ``reset`` policy any clean-wrong record resets it.
Otherwise:

* ``cross_shrinks`` (default): if any record crossed or was clean-wrong it shrinks, with the mean
  of those records' distances (clean-wrong records count as distance 0); only a key whose every
  record stayed correct within its budget expands. Crossing once is evidence that the margin is
  at most that distance, so one crossing outweighs records that did not cross.
* ``miss_expands`` (the IMA authors' segmentation code): any record that stayed correct within
  its budget expands the key; a key whose every record crossed (or was clean-wrong) shrinks, one
  record after the other in the order recorded (``average``: ``E <- (E + d) / 2`` per record;
  ``replace``: ``E = `` the mean distance).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

SHRINK_RULES = ("average", "replace")
CLEAN_WRONG_POLICIES = ("shrink", "reset")
CLIP_MINIMA = ("zero", "delta")
REPEAT_DRAW_RULES = ("cross_shrinks", "miss_expands")


@dataclass
class MarginEpochStats:
    """What one :meth:`MarginStore.end_epoch` did. Fractions are over the keys updated."""

    epoch: int
    keys_updated: int
    records: int
    fraction_expanded: float
    fraction_shrunk: float
    fraction_reset: float
    fraction_crossed_records: float
    margin_mean: float
    margin_median: float
    margin_min: float
    margin_max: float
    keys_total: int
    margin_q25: float = float("nan")
    margin_q75: float = float("nan")
    # Of the keys with a margin, the fraction at eps_max: near 1, IMA trains like vanilla
    # adversarial training at eps_max, not like a per-sample margin method.
    fraction_saturated: float = float("nan")

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def _encode_key(key: Hashable) -> Any:
    # JSON has no tuples: tuples become lists and are turned back into tuples on load.
    if isinstance(key, tuple):
        return [_encode_key(k) for k in key]
    if isinstance(key, (np.integer,)):
        return int(key)
    if isinstance(key, (int, str, float, bool)) or key is None:
        return key
    raise TypeError(f"margin key {key!r} of type {type(key).__name__} cannot be saved; use ints, "
                    f"strings or tuples of them")


def _decode_key(key: Any) -> Hashable:
    if isinstance(key, list):
        return tuple(_decode_key(k) for k in key)
    return key


def _normalise_key(key: Hashable) -> Hashable:
    """Make keys from numpy / torch scalars compare equal to plain Python ones."""
    if isinstance(key, tuple):
        return tuple(_normalise_key(k) for k in key)
    if isinstance(key, torch.Tensor):
        return key.item()
    if isinstance(key, np.generic):
        return key.item()
    return key


def _as_list(values: Any, n: int, name: str) -> List[Any]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    elif isinstance(values, np.ndarray):
        values = values.tolist()
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but {n} keys were given")
    return values


class MarginStore:
    """Margin estimates ``E`` keyed by sample, with IMA's epoch-end update.

    Args:
        eps_max: largest allowed margin (> 0).
        delta: expansion step (> 0); also the initial margin unless ``initial`` is given.
        shrink: ``"average"`` (``E = (d + E) / 2``) or ``"replace"`` (``E = d``).
        on_clean_wrong: ``"shrink"`` (shrink with distance 0) or ``"reset"`` (``E = delta``).
        clip_min: ``"zero"`` (clip to ``[0, eps_max]``) or ``"delta"`` (``[delta, eps_max]``).
        initial: margin of a key never updated; defaults to ``delta``.
        repeat_draws: ``"cross_shrinks"`` or ``"miss_expands"``: the rule for a key recorded
            several times in one epoch (module docstring).
    """

    def __init__(self, eps_max: float, delta: float, shrink: str = "average",
                 on_clean_wrong: str = "shrink", clip_min: str = "zero",
                 initial: Optional[float] = None, repeat_draws: str = "cross_shrinks"):
        if not (isinstance(eps_max, (int, float)) and math.isfinite(eps_max) and eps_max > 0):
            raise ValueError(f"eps_max must be a finite number > 0, got {eps_max!r}")
        if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0 < delta <= eps_max):
            raise ValueError(f"delta must be in (0, eps_max={eps_max}], got {delta!r}")
        if shrink not in SHRINK_RULES:
            raise ValueError(f"shrink must be one of {SHRINK_RULES}, got {shrink!r}")
        if on_clean_wrong not in CLEAN_WRONG_POLICIES:
            raise ValueError(f"on_clean_wrong must be one of {CLEAN_WRONG_POLICIES}, "
                             f"got {on_clean_wrong!r}")
        if clip_min not in CLIP_MINIMA:
            raise ValueError(f"clip_min must be one of {CLIP_MINIMA}, got {clip_min!r}")
        if repeat_draws not in REPEAT_DRAW_RULES:
            raise ValueError(f"repeat_draws must be one of {REPEAT_DRAW_RULES}, got {repeat_draws!r}")
        initial = delta if initial is None else float(initial)
        if not 0 <= initial <= eps_max:
            raise ValueError(f"initial must be in [0, eps_max={eps_max}], got {initial!r}")
        self.eps_max = float(eps_max)
        self.delta = float(delta)
        self.shrink = shrink
        self.on_clean_wrong = on_clean_wrong
        self.clip_min = clip_min
        self.repeat_draws = repeat_draws
        self.initial = initial
        self.epoch = 0
        self._margins: Dict[Hashable, float] = {}
        # key -> list of (crossed, distance, clean_correct) of the current epoch
        self._records: Dict[Hashable, List[Tuple[bool, float, bool]]] = {}

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self._margins)

    def __contains__(self, key: Hashable) -> bool:
        return _normalise_key(key) in self._margins

    def keys(self) -> List[Hashable]:
        """The keys that have been updated at least once."""
        return list(self._margins)

    def margin(self, key: Hashable) -> float:
        """The margin of one key (``initial`` when it was never updated)."""
        return self._margins.get(_normalise_key(key), self.initial)

    def get(self, keys: Sequence[Hashable], device: Any = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B,)`` margins of ``keys`` (the budgets of this batch's BPGD)."""
        return torch.tensor([self.margin(k) for k in keys], dtype=dtype, device=device)

    def values(self) -> np.ndarray:
        """Margins of all updated keys, ``(N,)``."""
        return np.asarray(list(self._margins.values()), dtype=np.float64)

    # ------------------------------------------------------------- recording
    def record(self, keys: Sequence[Hashable], crossed: Any, distance: Any,
               clean_correct: Any) -> None:
        """Remember one batch's outcome for the epoch-end update.

        Args:
            keys: ``B`` sample keys.
            crossed: ``(B,)`` bool, BPGD found a boundary point (only meaningful when clean-correct).
            distance: ``(B,)`` float, BPGD's distance (ignored where not crossed).
            clean_correct: ``(B,)`` bool, the clean sample was classified / segmented correctly.
        """
        keys = list(keys)
        crossed = _as_list(crossed, len(keys), "crossed")
        distance = _as_list(distance, len(keys), "distance")
        clean_correct = _as_list(clean_correct, len(keys), "clean_correct")
        for key, c, d, ok in zip(keys, crossed, distance, clean_correct):
            if bool(ok) and bool(c) and not (math.isfinite(float(d)) and float(d) >= 0):
                raise ValueError(f"distance of crossed sample {key!r} must be finite and >= 0, "
                                 f"got {d!r}")
            self._records.setdefault(_normalise_key(key), []).append(
                (bool(c) and bool(ok), float(d) if bool(c) and bool(ok) else 0.0, bool(ok)))

    def pending_records(self) -> Dict[Hashable, List[Tuple[bool, float, bool]]]:
        """The records of the current epoch (for merging across processes)."""
        return {k: list(v) for k, v in self._records.items()}

    def clear_records(self) -> None:
        """Drop the current epoch's records (after they were merged elsewhere)."""
        self._records = {}

    def add_records(self, records: Dict[Hashable, List[Tuple[bool, float, bool]]]) -> None:
        """Add records gathered elsewhere (e.g. another DDP rank) to the current epoch."""
        for key, items in records.items():
            self._records.setdefault(_normalise_key(key), []).extend(
                (bool(c), float(d), bool(ok)) for c, d, ok in items)

    # ---------------------------------------------------------------- update
    def _new_margin(self, old: float, items: List[Tuple[bool, float, bool]]) -> Tuple[float, str]:
        clean_wrong = any(not ok for _, _, ok in items)
        if clean_wrong and self.on_clean_wrong == "reset":
            return self.delta, "reset"
        shrink_distances = [d for c, d, ok in items if c or not ok]
        if self.repeat_draws == "miss_expands" and len(shrink_distances) < len(items):
            return old + self.delta, "expanded"
        if not shrink_distances:
            return old + self.delta, "expanded"
        if self.shrink == "replace":
            return float(np.mean(shrink_distances)), "shrunk"
        if self.repeat_draws == "miss_expands":
            new = old
            for d in shrink_distances:
                new = (new + d) / 2
            return new, "shrunk"
        return (float(np.mean(shrink_distances)) + old) / 2, "shrunk"

    def end_epoch(self) -> MarginEpochStats:
        """Apply the update rule to every key recorded this epoch and clear the records."""
        low = 0.0 if self.clip_min == "zero" else self.delta
        counts = {"expanded": 0, "shrunk": 0, "reset": 0}
        n_records = sum(len(v) for v in self._records.values())
        n_crossed = sum(c for v in self._records.values() for c, _, _ in v)
        for key, items in self._records.items():
            new, kind = self._new_margin(self.margin(key), items)
            self._margins[key] = min(max(new, low), self.eps_max)
            counts[kind] += 1
        n_keys = len(self._records)
        self._records = {}
        self.epoch += 1
        values = self.values()
        summary = (lambda f: float(f(values)) if values.size else float(self.initial))
        return MarginEpochStats(
            epoch=self.epoch, keys_updated=n_keys, records=n_records,
            fraction_expanded=counts["expanded"] / n_keys if n_keys else 0.0,
            fraction_shrunk=counts["shrunk"] / n_keys if n_keys else 0.0,
            fraction_reset=counts["reset"] / n_keys if n_keys else 0.0,
            fraction_crossed_records=n_crossed / n_records if n_records else 0.0,
            margin_mean=summary(np.mean), margin_median=summary(np.median),
            margin_min=summary(np.min), margin_max=summary(np.max), keys_total=len(self._margins),
            margin_q25=summary(lambda v: np.quantile(v, 0.25)),
            margin_q75=summary(lambda v: np.quantile(v, 0.75)),
            # end_epoch clips with min(new, eps_max): a saturated margin equals eps_max exactly.
            fraction_saturated=float(np.mean(values >= self.eps_max)) if values.size else 0.0)

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> Dict[str, Any]:
        """A JSON-able state; :meth:`from_state_dict` rebuilds an identical store."""
        return {
            "format": "nnunet_ima.MarginStore/1",
            "eps_max": self.eps_max, "delta": self.delta, "shrink": self.shrink,
            "on_clean_wrong": self.on_clean_wrong, "clip_min": self.clip_min,
            "repeat_draws": self.repeat_draws, "initial": self.initial, "epoch": self.epoch,
            "margins": [[_encode_key(k), v] for k, v in self._margins.items()],
            "records": [[_encode_key(k), [list(r) for r in v]] for k, v in self._records.items()],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replace this store's content with ``state`` (settings included)."""
        if state.get("format") != "nnunet_ima.MarginStore/1":
            raise ValueError("not a MarginStore state (missing or unknown 'format' entry)")
        # States saved before repeat_draws existed used the cross_shrinks rule.
        fresh = MarginStore(state["eps_max"], state["delta"], state["shrink"],
                            state["on_clean_wrong"], state["clip_min"], state["initial"],
                            state.get("repeat_draws", "cross_shrinks"))
        self.__dict__.update(fresh.__dict__)
        self.epoch = int(state["epoch"])
        self._margins = {_decode_key(k): float(v) for k, v in state["margins"]}
        self._records = {_decode_key(k): [(bool(c), float(d), bool(ok)) for c, d, ok in v]
                         for k, v in state.get("records", [])}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "MarginStore":
        store = cls.__new__(cls)
        store.load_state_dict(state)
        return store
