"""Compare the evaluator's presets run by ``benchmarks/presets_compare.sh``: per norm, model and
noise level the worst-case TVDI of PGD-100 and of each preset, ``standard - sea`` (positive:
standard is weaker), the member of each preset whose column is lowest, and each run's wall time
in multiples of PGD-100's.

Usage: python benchmarks/presets_compare.py OUT
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

RUNS = ("pgd", "quick", "standard", "sea", "rse")
TOLERANCE = 0.5  # points of TVDI: how much above sea standard may be and still count as no weaker


def load(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    seconds = os.path.join(folder, "wall_seconds")
    summary["_wall_seconds"] = float(open(seconds).read()) if os.path.isfile(seconds) else None
    return summary


def strongest_member(summary: dict, model: str, noise: str) -> str:
    """The member with the lowest TVDI column at ``noise`` (a later member's column counts the
    worst case so far on the slices it skipped, :mod:`nnunet_ima.evaluation.ensemble`)."""
    per_attack = summary.get("ensemble", {}).get("per_attack", {}).get(model)
    if not per_attack:
        return "-"
    return min(per_attack, key=lambda m: per_attack[m]["noise"][noise]["tvdi"])


def norm_report(out: str, norm: str) -> List[str]:
    runs: Dict[str, dict] = {}
    for run in RUNS:
        summary = load(os.path.join(out, norm, run))
        if summary is not None:
            runs[run] = summary
    if not runs:
        return []
    first = next(iter(runs.values()))
    models = list(first["models"])
    levels = list(first["models"][models[0]]["noise"])
    names = [r for r in RUNS if r in runs]
    lines = [f"### {norm.upper()} (TVDI %, lower is a stronger attack)", "",
             "| model | noise | " + " | ".join(names) + " | standard - sea | strongest member "
             "(standard / sea / rse) |", "|---" * (len(names) + 4) + "|"]
    verdicts = []
    for model in models:
        for noise in levels:
            cells = [f"{100 * runs[r]['models'][model]['noise'][noise]['tvdi']:.2f}" for r in names]
            gap = "-"
            if "standard" in runs and "sea" in runs and float(noise) > 0:
                diff = 100 * (runs["standard"]["models"][model]["noise"][noise]["tvdi"]
                              - runs["sea"]["models"][model]["noise"][noise]["tvdi"])
                gap = f"{diff:+.2f}"
                verdicts.append(diff <= TOLERANCE)
            strongest = " / ".join(strongest_member(runs[r], model, noise) if r in runs else "-"
                                   for r in ("standard", "sea", "rse"))
            lines.append(f"| {model} | {noise} | " + " | ".join(cells) + f" | {gap} | "
                         f"{strongest if float(noise) > 0 else '-'} |")
    lines.append("")
    if verdicts:
        lines.append(f"standard no weaker than sea (within {TOLERANCE} points) at "
                     f"{sum(verdicts)} of {len(verdicts)} (model, noise) pairs")
    base = runs.get("pgd", {}).get("_wall_seconds")
    if base:
        costs = ", ".join(f"{r} {runs[r]['_wall_seconds'] / base:.1f}x"
                          for r in names if runs[r].get("_wall_seconds"))
        lines.append(f"wall time in multiples of PGD-100 ({base:.0f} s): {costs}")
    minimal = runs.get("standard", {}).get("minimal_noise")
    if minimal:
        lines += ["", "Minimal adversarial noise per slice (standard preset's grid and the "
                      "minimal-perturbation attack):", ""]
        lines.append("```\n" + json.dumps(minimal, indent=1) + "\n```")
    return lines + [""]


def main(argv: List[str]) -> int:
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    lines = norm_report(argv[0], "l2") + norm_report(argv[0], "linf")
    print("\n".join(lines) if lines else f"no finished runs under {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
