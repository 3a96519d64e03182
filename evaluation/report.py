"""Results on disk: per-(model, noise) parts, summary.json, per_slice.csv, tables in markdown.

Every file is written to a temporary name and renamed, so an interrupted run leaves either the
old file or the new one, never a truncated one. A part (``parts/<model>__<noise>.npz``) holds
the per-slice counts of one (model, noise level) and its example slice; a rerun with the same
settings skips the parts that exist.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.metrics import adi, robustness_auc, tvdi

from nnunet_ima.evaluation.robustness import NoiseResult
from nnunet_ima.evaluation.training_cases import footnote

CONFIG_FILENAME = "config.json"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a unique temporary file beside ``path``, then rename it over ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def noise_key(noise: float) -> str:
    """``5.0`` -> ``"5"``, ``0.25`` -> ``"0.25"``: the JSON key and table header of a level."""
    return f"{noise:g}"


def part_path(out: str, model: str, noise: float) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model)
    return os.path.join(out, "parts", f"{safe}__noise{noise_key(noise)}.npz")


def save_part(path: str, result: NoiseResult) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, cases=np.array(result.cases), slices=np.array(result.slices),
                        tp=result.tp, fp=result.fp, fn=result.fn,
                        **{f"example_{k}": v for k, v in result.example.items()})
    atomic_write_bytes(path, buffer.getvalue())


def load_part(path: str, expected_keys: Optional[Sequence[Tuple[str, int]]] = None) -> NoiseResult:
    """Read a part; with ``expected_keys`` (the ``(case, slice)`` list of this run) a part made
    on other slices is refused instead of being mixed into the tables."""
    try:
        with np.load(path) as z:
            example = {k[len("example_"):]: z[k] for k in z.files if k.startswith("example_")}
            result = NoiseResult([str(c) for c in z["cases"]], [int(s) for s in z["slices"]],
                                 z["tp"], z["fp"], z["fn"], example)
    except Exception as e:  # written atomically, so only a foreign or damaged file gets here
        raise UserInputError(f"cannot read the partial result {path} ({type(e).__name__}: {e}); "
                             f"delete it to recompute it") from None
    if expected_keys is not None and list(zip(result.cases, result.slices)) != list(expected_keys):
        raise UserInputError(f"{path} was computed on other test slices than this run's (did the "
                             f"test cases or the preprocessed data change?); pass --overwrite to "
                             f"recompute, or choose another -o")
    return result


def summarise(results: Dict[float, NoiseResult], class_names: Sequence[str]) -> dict:
    """The ``summary.json`` entry of one model: TVDI, ADI, per-class values per noise, AUCs."""
    noise_entries = {}
    for noise in sorted(results):
        r = results[noise]
        total, per_class = tvdi(torch.as_tensor(r.tp), torch.as_tensor(r.fp), torch.as_tensor(r.fn))
        per_class_adi = r.per_class_dice.mean(axis=0)
        noise_entries[noise_key(noise)] = {
            "tvdi": total, "adi": adi(r.slice_dice), "n_slices": len(r.cases),
            "per_class": {name: {"tvdi": float(per_class[i]), "adi": float(per_class_adi[i])}
                          for i, name in enumerate(class_names)}}
    entry = {"noise": noise_entries}
    levels = sorted(results)
    if len(levels) >= 2 and levels[-1] > 0:
        for metric in ("tvdi", "adi"):
            entry[f"auc_{metric}"] = robustness_auc(
                levels, [noise_entries[noise_key(n)][metric] for n in levels])
    return entry


LOSS_NAMES = {"dc_ce": "Dice + CE", "ce": "CE"}
NORM_NAMES = {"l2": "L2", "linf": "Linf"}


def attack_caption(config: Optional[dict]) -> str:
    """The attack of a run in words, e.g. ``pgd (L2, 100 steps, alpha 5, random start, loss
    Dice + CE)``; ``""`` when ``config`` does not name it."""
    if not config or "steps" not in config:
        return ""
    attack = config.get("attack", "pgd")
    parts = [NORM_NAMES.get(config.get("norm"), config.get("norm")), f"{config['steps']} steps"]
    if config.get("alpha") is not None:
        parts.append(f"alpha {config['alpha']:g}")
    parts.append("random start" if config.get("random_start") else "no random start")
    if attack == "segpgd":
        parts.append("loss SegPGD's weighted CE")
    elif config.get("attack_loss"):
        parts.append(f"loss {LOSS_NAMES.get(config['attack_loss'], config['attack_loss'])}")
    return f"{attack} ({', '.join(p for p in parts if p)})"


def train_cases_scored(config: Optional[dict]) -> Dict[str, List[str]]:
    """Per model, the training cases scored under ``--allow-train-cases`` (none: ``{}``)."""
    models = (config or {}).get("models", {})
    return {name: entry["train_cases_scored"] for name, entry in models.items()
            if isinstance(entry, dict) and entry.get("train_cases_scored")}


def markdown_table(summary: dict, metric: str, noise_levels: Sequence[float]) -> str:
    """One row per model, one column per noise level, percent with two decimals (paper style);
    the caption names the attack when ``summary`` holds the run's ``config``, and a footnote
    names the training cases scored, if any (``--allow-train-cases``)."""
    header = "| model | " + " | ".join(f"noise {noise_key(n)}" for n in noise_levels) + " |"
    if any(f"auc_{metric}" in m for m in summary["models"].values()):
        header += " AUC |"
    caption = attack_caption(summary.get("config"))
    lines = [f"{metric.upper()} (%)" + (f" under {caption}" if caption else ""), "", header,
             "|" + "---|" * (header.count("|") - 1)]
    for name, entry in summary["models"].items():
        cells = [f"{100 * entry['noise'][noise_key(n)][metric]:.2f}" for n in noise_levels]
        if f"auc_{metric}" in entry:
            cells.append(f"{100 * entry[f'auc_{metric}']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = footnote(train_cases_scored(summary.get("config")))
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def per_slice_rows(model: str, results: Dict[float, NoiseResult], class_names: Sequence[str]
                   ) -> List[dict]:
    rows = []
    for noise in sorted(results):
        r = results[noise]
        dice = r.per_class_dice
        for i, (case, index) in enumerate(zip(r.cases, r.slices)):
            row = {"model": model, "noise": noise_key(noise), "case": case, "slice": index,
                   "slice_dice": f"{r.slice_dice[i]:.6f}"}
            row.update({f"dice_{name}": f"{dice[i, c]:.6f}" for c, name in enumerate(class_names)})
            rows.append(row)
    return rows


def write_outputs(out: str, summary: dict, rows: List[dict], noise_levels: Sequence[float]) -> None:
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    buffer = io.StringIO()
    if rows:
        # Models of different datasets have different classes: one column per class name seen.
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(os.path.join(out, "per_slice.csv"), buffer.getvalue())
    for metric in ("tvdi", "adi"):
        atomic_write_text(os.path.join(out, f"{metric}.md"),
                          markdown_table(summary, metric, noise_levels))
