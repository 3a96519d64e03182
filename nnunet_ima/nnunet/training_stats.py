"""Per-epoch statistics of adversarial training: accumulation, the CSV file and the margin picture.

nnU-Net's ``MetaLogger`` only accepts its own keys, so these statistics go to the training log
(as text) and to ``ima_stats.csv`` / ``margins_hist.png`` in the fold's output folder.
"""
from __future__ import annotations

import csv
import operator
import os
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_ima.io import replace_atomically

STATS_FILENAME = "ima_stats.csv"
HISTOGRAM_FILENAME = "margins_hist.png"


@dataclass
class EpochAccumulator:
    """Sums over the training steps of one epoch.

    ``clean_dice`` sums the clean slice Dice of every sample; ``adv_dice`` sums the slice Dice
    of every adversarial input trained on (the PGD outputs for Adv, the boundary points of the
    crossed slices for IMA); ``attacked`` counts samples that were attacked and ``crossed``
    those whose Dice fell below the threshold within their budget. ``adv_weight`` sums, over the
    steps, the weight of the adversarial term in the step's loss (0 in a step without one).
    """

    samples: int = 0
    clean_dice: float = 0.0
    clean_correct: int = 0
    attacked: int = 0
    crossed: int = 0
    adv_dice: float = 0.0
    adv_samples: int = 0
    attack_seconds: float = 0.0
    step_seconds: float = 0.0
    steps: int = 0
    adv_weight: float = 0.0

    def add(self, clean_dice: Sequence[float], clean_correct: int, adv_dice: Sequence[float],
            attacked: int, crossed: int, attack_seconds: float, step_seconds: float,
            adv_weight: float = 0.0) -> None:
        self.samples += len(clean_dice)
        self.clean_dice += float(np.sum(clean_dice))
        self.clean_correct += int(clean_correct)
        self.adv_dice += float(np.sum(adv_dice))
        self.adv_samples += len(adv_dice)
        self.attacked += int(attacked)
        self.crossed += int(crossed)
        self.attack_seconds += attack_seconds
        self.step_seconds += step_seconds
        self.steps += 1
        self.adv_weight += float(adv_weight)

    @classmethod
    def merged(cls, parts: Sequence["EpochAccumulator"]) -> "EpochAccumulator":
        """The epoch of several DDP ranks: counts and sums added, seconds of the slowest rank."""
        total = cls()
        for part in parts:
            for f in fields(cls):
                # Ranks run in parallel: an epoch lasts as long as its slowest rank.
                combine = max if f.name.endswith("_seconds") else operator.add
                setattr(total, f.name, combine(getattr(total, f.name), getattr(part, f.name)))
        return total

    def summary(self) -> Dict[str, float]:
        """Means over the epoch (NaN where nothing was counted)."""
        def ratio(a: float, b: float) -> float:
            return a / b if b else float("nan")
        return {
            "samples": self.samples,
            "clean_dice": ratio(self.clean_dice, self.samples),
            "fraction_clean_correct": ratio(self.clean_correct, self.samples),
            "adv_dice": ratio(self.adv_dice, self.adv_samples),
            "adv_weight": ratio(self.adv_weight, self.steps),
            "fraction_attacked": ratio(self.attacked, self.samples),
            "fraction_crossed": ratio(self.crossed, self.attacked),
            "attack_seconds": self.attack_seconds,
            "step_seconds": self.step_seconds,
        }


def write_epoch_row(path: str, row: Dict[str, float]) -> None:
    """Add ``row`` (with an ``epoch`` key) to the CSV at ``path``, atomically.

    Rows of this epoch or later are dropped first: after ``--c`` the run repeats the epochs
    that followed the checkpoint it continued from, and their old rows no longer describe it.
    """
    rows: List[Dict[str, str]] = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < int(row["epoch"])]
    rows.append({k: _format(v) for k, v in row.items()})
    columns = list(row)
    for r in rows:
        columns += [k for k in r if k not in columns]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    replace_atomically(path, write)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_for_log(row: Dict[str, float]) -> str:
    """``key value`` pairs, 4 significant digits, for nnU-Net's training log."""
    return ", ".join(f"{k} {_format(v) if not isinstance(v, float) else f'{v:.4g}'}"
                     for k, v in row.items())


def plot_margin_histogram(margins: np.ndarray, path: str, eps_max: float, epoch: int,
                          initial: Optional[float] = None, bins: int = 30) -> None:
    """Histogram of the per-slice margins (``(N,)``) to ``path`` (PNG, written atomically)."""
    from nnunet_ima.plotting import pyplot, save_figure
    fig, ax = pyplot().subplots(figsize=(6, 4))
    if margins.size:
        ax.hist(margins, bins=np.linspace(0, eps_max, bins + 1), color="tab:blue", alpha=0.8)
    if initial is not None:
        ax.axvline(initial, color="tab:gray", linestyle="--", label=f"initial {initial:.3g}")
        ax.legend(loc="upper right")
    ax.set_xlim(0, eps_max)
    ax.set_xlabel("estimated margin (L2 / Linf, input units)")
    ax.set_ylabel("slices")
    ax.set_title(f"IMA margins after epoch {epoch} ({margins.size} slices)")
    fig.tight_layout()
    save_figure(fig, path)
