"""How many slices each slice-correctness rule of IMA calls correct, on evaluated slices.

IMA grows a slice's margin while the slice stays "correct" (slice Dice >= the threshold) under
attack, so a rule that calls a poorly segmented slice correct lets its margin run up to eps_max.
This script reads the clean pass (noise 0) of ``nnunet-ima-eval`` / ``nnunet-ima ablation``
evaluations (the per-slice, per-class TP / FP / FN the evaluator keeps in ``parts/``) and prints,
per evaluation, the fraction of slices each rule calls correct:

- ``max, zero``: the best foreground class, absent classes scoring 0 (the authors' recipe);
- ``mean, one``: the mean over the classes present (the printed Algorithm 1);
- ``min, one``: the worst class present (``dice_reduce: "min"``, ``ima_authors_min``);

and the mean per-class Dice over the slices where the class is present. Reads files only.

Usage: python benchmarks/correctness_rules.py EVAL_FOLDER [EVAL_FOLDER ...] [--threshold 0.6]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.metrics import dice_from_counts, slice_dice_from_counts

RULES = (("max", "zero"), ("mean", "one"), ("min", "one"))


def rule_fractions(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
                   threshold: float) -> List[float]:
    """Fraction of the ``N`` slices of ``(N, K)`` counts each rule of :data:`RULES` calls
    correct."""
    counts = [torch.as_tensor(c) for c in (tp, fp, fn)]
    return [float((slice_dice_from_counts(*counts, reduce, absent) >= threshold)
                  .double().mean()) for reduce, absent in RULES]


def present_class_dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> List[float]:
    """Per class, the mean Dice over the slices where it is in the ground truth or prediction
    (NaN where it never is)."""
    dice = dice_from_counts(torch.as_tensor(tp), torch.as_tensor(fp), torch.as_tensor(fn))
    present = torch.as_tensor(tp + fp + fn) > 0
    return [float(dice[present[:, k], k].mean()) if present[:, k].any() else float("nan")
            for k in range(dice.shape[1])]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="evaluation folders (with summary.json, parts/)")
    p.add_argument("--threshold", type=float, default=0.6, help="the Dice threshold")
    args = p.parse_args(argv)
    from nnunet_ima.nnunet.ablation import slice_counts
    print("| evaluation | slices | " + " | ".join(f"correct: {r}, {a}" for r, a in RULES)
          + " | Dice per class where present |")
    print("|---|---|" + "---|" * len(RULES) + "---|")
    try:
        for folder in args.folders:
            clean = slice_counts(folder)[0.0]
            fractions = rule_fractions(clean.tp, clean.fp, clean.fn, args.threshold)
            per_class = present_class_dice(clean.tp, clean.fp, clean.fn)
            print(f"| {os.path.normpath(folder)} | {len(clean.slices)} | "
                  + " | ".join(f"{100 * f:.0f} %" for f in fractions) + " | "
                  + " / ".join(f"{d:.2f}" for d in per_class) + " |")
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
