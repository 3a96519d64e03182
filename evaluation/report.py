"""Results on disk: per-(model, noise) parts, summary.json, per_slice.csv, tables in markdown.

Where the samples are whole cases (a 3D configuration, :data:`.samples.WHOLE_CASE`), every
noise level of ``summary.json`` also holds the per-case per-class metrics in the convention of
nnU-Net's ``summary.json`` (:func:`nnunet_case_summary`), and ``per_slice.csv`` has one row per
case (``slice`` reads ``volume``) with nnU-Net's Dice beside the evaluator's.

Every noise level of a model (under an ensemble: of its per-slice worst case) also holds
``size_breakdown``, Dice per class and ground-truth object size (:mod:`.objects`), written as a
table to ``size_breakdown.csv`` and ``size_breakdown.md`` as well.

Every file is written to a temporary name and renamed, so an interrupted run leaves either the
old file or the new one, never a truncated one. A part (``parts/<model>__<noise>.npz``) holds
the per-slice counts of one (model, noise level), its example slice and the record of what
produced it (:mod:`.provenance`); a rerun with the same settings skips the parts whose record is
its own.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import replace_atomically, write_text
from nnunet_ima.metrics import adi, robustness_auc, tvdi

from nnunet_ima.evaluation.objects import breakdown
from nnunet_ima.evaluation.robustness import NoiseResult
from nnunet_ima.evaluation.samples import WHOLE_CASE
from nnunet_ima.evaluation.training_cases import footnote

CONFIG_FILENAME = "config.json"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    replace_atomically(path, write)


def noise_key(noise: float) -> str:
    """``5.0`` -> ``"5"``, ``0.25`` -> ``"0.25"``: the JSON key and table header of a level."""
    return f"{noise:g}"


def part_path(out: str, model: str, noise: float, member: Optional[str] = None) -> str:
    """The part of one (model, noise level), and of one ensemble ``member`` (``None``: the
    single attack's)."""
    suffix = f"__{member}" if member is not None else ""
    return os.path.join(out, "parts",
                        f"{safe_model_name(model)}__noise{noise_key(noise)}{suffix}.npz")


def safe_model_name(model: str) -> str:
    """``model`` as a file name: characters other than letters, digits, ``_.-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model)


def save_part(path: str, result: NoiseResult, meta: Optional[dict] = None,
              record: Optional[dict] = None) -> None:
    """Write a part; ``meta`` (JSON-serialisable, e.g. an ensemble member's attacked slices and
    seconds) is stored beside the counts and read by :func:`load_part_meta`, ``record`` (what
    produced it, :class:`.provenance.PartRecords`) likewise, read by :func:`load_part_record`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    extra = {} if meta is None else {"meta_json": np.array(json.dumps(meta))}
    if record is not None:
        extra["record_json"] = np.array(json.dumps(record))
    if result.objects is not None:
        extra["objects"] = result.objects  # (N, K, B, 5); absent for a result without them
    np.savez_compressed(buffer, cases=np.array(result.cases), slices=np.array(result.slices),
                        tp=result.tp, fp=result.fp, fn=result.fn,
                        **{f"example_{k}": v for k, v in result.example.items()}, **extra)
    atomic_write_bytes(path, buffer.getvalue())


def load_part_meta(path: str) -> dict:
    """The ``meta`` saved with a part (``{}`` for none)."""
    with np.load(path) as z:
        return json.loads(str(z["meta_json"])) if "meta_json" in z.files else {}


def load_part_record(path: str) -> Optional[dict]:
    """The record saved with a part; ``None`` for a part without one (written by an older
    version) or a file that cannot be read."""
    try:
        with np.load(path) as z:
            return json.loads(str(z["record_json"])) if "record_json" in z.files else None
    except Exception:  # a damaged or foreign file: it has no usable record, so it is recomputed
        return None


def load_part(path: str, expected_keys: Optional[Sequence[Tuple[str, int]]] = None) -> NoiseResult:
    """Read a part; with ``expected_keys`` (the ``(case, slice)`` list of this run) a part made
    on other slices is refused instead of being mixed into the tables. A part written before
    object counts existed is read with ``objects`` ``None``: it is still reused (a resume of an
    old folder recomputes nothing), and its level simply has no size breakdown."""
    try:
        with np.load(path) as z:
            example = {k[len("example_"):]: z[k] for k in z.files if k.startswith("example_")}
            result = NoiseResult([str(c) for c in z["cases"]], [int(s) for s in z["slices"]],
                                 z["tp"], z["fp"], z["fn"], example,
                                 z["objects"] if "objects" in z.files else None)
    except Exception as e:  # written atomically, so only a foreign or damaged file gets here
        raise UserInputError(f"cannot read the partial result {path} ({type(e).__name__}: {e}); "
                             f"delete it to recompute it") from None
    if expected_keys is not None and list(zip(result.cases, result.slices)) != list(expected_keys):
        raise UserInputError(f"{path} was computed on other test slices than this run's (did the "
                             f"test cases or the preprocessed data change?); pass --overwrite to "
                             f"recompute, or choose another -o")
    return result


def whole_cases(result: NoiseResult) -> bool:
    """Whether every sample of ``result`` is a whole case (a 3D configuration's samples)."""
    return bool(result.slices) and all(int(s) == WHOLE_CASE for s in result.slices)


NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "n_pred", "n_ref")
"""The metrics of nnU-Net's ``summary.json`` that TP / FP / FN determine (not ``TN``: it needs
the number of voxels, which the counts do not keep)."""


def nnunet_metrics(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> Dict[str, np.ndarray]:
    """``(N, K)`` counts -> nnU-Net's per-case per-class metrics, each ``(N, K)`` (nnunetv2's
    ``evaluation.evaluate_predictions.compute_metrics``): ``Dice = 2 TP / (2 TP + FP + FN)`` and
    ``IoU = TP / (TP + FP + FN)``, both NaN where ``TP + FP + FN == 0`` (a class absent from
    reference and prediction); ``n_pred = TP + FP``, ``n_ref = TP + FN``."""
    tp, fp, fn = (np.asarray(c, dtype=np.int64) for c in (tp, fp, fn))
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(union > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(union > 0, tp / union, np.nan)
    return {"Dice": dice, "IoU": iou, "FP": fp, "TP": tp, "FN": fn, "n_pred": tp + fp,
            "n_ref": tp + fn}


def _json_number(value) -> Optional[float]:
    """A float for JSON, ``None`` (``null``) for NaN: strict JSON has no NaN, which nnU-Net's
    own ``summary.json`` writes there."""
    value = float(value)
    return None if np.isnan(value) else value


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmean`` without its warning for an all-NaN column (NaN, as nnU-Net gets)."""
    with np.errstate(invalid="ignore"):
        count = (~np.isnan(values)).sum(axis=axis)
        total = np.nansum(values, axis=axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def nnunet_case_summary(result: NoiseResult, class_names: Sequence[str]) -> dict:
    """One noise level's per-case metrics as ``nnUNetv2_evaluate_folder`` writes them to its
    ``summary.json``, keyed by class name instead of label value:

    * ``metric_per_case``: per case, in the run's order, ``{"case", "metrics": {class:
      {Dice, IoU, FP, TP, FN, n_pred, n_ref}}}`` (:func:`nnunet_metrics`);
    * ``mean``: per class, the mean of each metric over the cases, NaN cases left out
      (``np.nanmean``);
    * ``foreground_mean``: per metric, the plain mean of ``mean`` over the classes (NaN if any
      class mean is NaN, as ``np.mean`` gives).

    nnU-Net's NaN is written as ``null``. The ignore label's voxels count nowhere, as in
    nnU-Net's ignore mask; background is not among the classes, as in nnU-Net's label list.
    """
    metrics = nnunet_metrics(result.tp, result.fp, result.fn)
    per_case = [{"case": case,
                 "metrics": {name: {m: (_json_number(metrics[m][i, c]) if m in ("Dice", "IoU")
                                        else int(metrics[m][i, c])) for m in NNUNET_METRICS}
                             for c, name in enumerate(class_names)}}
                for i, case in enumerate(result.cases)]
    means = {m: _nanmean(metrics[m].astype(np.float64), axis=0) for m in NNUNET_METRICS}
    return {"metric_per_case": per_case,
            "mean": {name: {m: _json_number(means[m][c]) for m in NNUNET_METRICS}
                     for c, name in enumerate(class_names)},
            "foreground_mean": {m: _json_number(np.mean(means[m])) for m in NNUNET_METRICS}}


def summarise(results: Dict[float, NoiseResult], class_names: Sequence[str],
              size_bins: Optional[Sequence[int]] = None) -> dict:
    """The ``summary.json`` entry of one model: TVDI, ADI, per-class values per noise, AUCs;
    for whole cases (3D) also ``n_cases`` and nnU-Net's per-case metrics
    (:func:`nnunet_case_summary`) at each noise level. With ``size_bins`` (the run's object-size
    edges), each level whose result has object counts also holds ``size_breakdown``: per class
    and size bin ``{objects, voxels, object_dice, detected_fraction}``
    (:func:`.objects.breakdown`); a level read from a part written before object counts has
    none."""
    noise_entries = {}
    for noise in sorted(results):
        r = results[noise]
        total, per_class = tvdi(torch.as_tensor(r.tp), torch.as_tensor(r.fp), torch.as_tensor(r.fn))
        per_class_adi = r.per_class_dice.mean(axis=0)
        noise_entries[noise_key(noise)] = {
            "tvdi": total, "adi": adi(r.slice_dice), "n_slices": len(r.cases),
            "per_class": {name: {"tvdi": float(per_class[i]), "adi": float(per_class_adi[i])}
                          for i, name in enumerate(class_names)}}
        if whole_cases(r):
            noise_entries[noise_key(noise)].update(
                n_cases=len(r.cases), nnunet_per_case=nnunet_case_summary(r, class_names))
        if size_bins is not None and r.objects is not None:
            noise_entries[noise_key(noise)]["size_breakdown"] = breakdown(r.objects, class_names,
                                                                          size_bins)
    entry = {"noise": noise_entries}
    levels = sorted(results)
    if len(levels) >= 2 and levels[-1] > 0:
        for metric in ("tvdi", "adi"):
            entry[f"auc_{metric}"] = robustness_auc(
                levels, [noise_entries[noise_key(n)][metric] for n in levels])
    return entry


def summarise_ensemble(worst: Dict[float, NoiseResult], worst_tvdi: Dict[float, NoiseResult],
                       class_names: Sequence[str],
                       size_bins: Optional[Sequence[int]] = None) -> dict:
    """The ``summary.json`` entry of a model under an ensemble: ADI (and per-class ADI, AUC)
    of the per-slice worst case, TVDI (and per-class TVDI, AUC) of the TVDI worst case (see
    :mod:`.ensemble`: each metric is the worst the members' per-slice results allow). The size
    breakdown (with ``size_bins``) is the per-slice worst case's, like the per-slice values."""
    entry = summarise(worst, class_names, size_bins)
    by_tvdi = summarise(worst_tvdi, class_names)
    for key, level in entry["noise"].items():
        level["tvdi"] = by_tvdi["noise"][key]["tvdi"]
        for name in class_names:
            level["per_class"][name]["tvdi"] = by_tvdi["noise"][key]["per_class"][name]["tvdi"]
    if "auc_tvdi" in by_tvdi:
        entry["auc_tvdi"] = by_tvdi["auc_tvdi"]
    return entry


LOSS_NAMES = {"dc_ce": "Dice + CE", "ce": "CE"}
NORM_NAMES = {"l2": "L2", "linf": "Linf"}


def attack_caption(config: Optional[dict]) -> str:
    """The attack of a run in words, e.g. ``pgd (L2, 100 steps, alpha 5, random start, loss
    Dice + CE)``; ``""`` when ``config`` does not name it. Under a ``--preset``: ``preset sea:``,
    the members (those that fix their own steps with them), steps, restarts and norm, and what
    the preset reproduces (:func:`.ensemble.preset_note`)."""
    from nnunet_ima.evaluation.ensemble import MEMBERS, preset_note  # report is imported early
    if not config or "steps" not in config:
        return ""
    attack, preset = config.get("attack", "pgd"), config.get("preset")
    restarts = config.get("restarts", 1)
    # Said when set, and always under a preset (whose protocol names its restarts).
    restarts_part = (f"{restarts} restart{'s' if restarts != 1 else ''}"
                     if restarts != 1 or preset else "")
    if attack == "ensemble":
        members = [f"{m} ({MEMBERS[m].steps} steps)"
                   if m in MEMBERS and MEMBERS[m].steps not in (None, config["steps"]) else m
                   for m in config["ensemble"]]
        parts = [NORM_NAMES.get(config.get("norm"), config.get("norm")),
                 f"{config['steps']} steps "
                 + ("for the others" if members != list(config["ensemble"]) else "each"),
                 f"pgd / segpgd alpha {config['alpha']:g}",
                 "random start" if config.get("random_start") else "no random start",
                 restarts_part]
        caption = (f"the per-slice worst case of {', '.join(members)} "
                   f"({', '.join(p for p in parts if p)})")
        if preset:
            note = preset_note(preset, config.get("norm"))
            caption = f"preset {preset}: {caption}" + (f"; {note}" if note else "")
        return caption
    parts = [NORM_NAMES.get(config.get("norm"), config.get("norm")), f"{config['steps']} steps"]
    if config.get("alpha") is not None:
        parts.append(f"alpha {config['alpha']:g}")
    parts.append("random start" if config.get("random_start") else "no random start")
    parts.append(restarts_part)
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
    inference = (summary.get("config") or {}).get("inference")
    if inference:
        caption += (f", through nnU-Net's predictor (tile step {inference['tile_step_size']:g}, "
                    f"{'mirroring' if inference['mirroring'] else 'no mirroring'})")
    lines = [f"{metric.upper()} (%)" + (f" under {caption}" if caption else ""), "", header,
             "|" + "---|" * (header.count("|") - 1)]
    if _scores_cases(summary):
        lines[1:1] = ["", CASES_CAPTION]
    masking = summary.get("masking_checks", {})
    notes: List[str] = []
    for name, entry in summary["models"].items():
        cells = [f"{100 * entry['noise'][noise_key(n)][metric]:.2f}" for n in noise_levels]
        if f"auc_{metric}" in entry:
            cells.append(f"{100 * entry[f'auc_{metric}']:.2f}")
        marks = ""
        for warning in masking.get(name, {}).get("warnings", []):
            notes.append(warning)
            marks += f" [^{len(notes)}]"
        lines.append(f"| {name}{marks} | " + " | ".join(cells) + " |")
    note = footnote(train_cases_scored(summary.get("config")), summary.get("config"))
    if note:
        lines += ["", note]
    if notes:
        lines += ["", "Gradient-masking checks that fired (the numbers above may overstate "
                      "robustness):"]
        lines += [f"[^{k}]: {text}" for k, text in enumerate(notes, start=1)]
    if "ensemble" in summary:
        lines += ["", per_attack_table(summary, metric, noise_levels)]
    return "\n".join(lines) + "\n"


CASES_CAPTION = ("Each sample is a whole case (3D configuration; the noise budget is per volume): "
                 "TVDI pools TP / FP / FN over the cases, ADI averages the cases' Dice. "
                 "summary.json has nnU-Net's per-case per-class Dice (nnunet_per_case).")


def _scores_cases(summary: dict) -> bool:
    """Whether the models of ``summary`` were scored on whole cases."""
    return any("n_cases" in level for entry in summary["models"].values()
               for level in entry["noise"].values())


def per_attack_table(summary: dict, metric: str, noise_levels: Sequence[float]) -> str:
    """Each ensemble member's own column beside the worst case, per model, and what each
    member cost (slices attacked, seconds) relative to the first member."""
    ensemble = summary["ensemble"]
    header = "| model | attack | " + " | ".join(f"noise {noise_key(n)}" for n in noise_levels) \
             + " | slices attacked | seconds |"
    lines = [f"{metric.upper()} (%) per attack (a member skips the slices already at Dice 0 and "
             f"keeps the worst case so far there)", "", header,
             "|" + "---|" * (header.count("|") - 1)]
    for name, entry in summary["models"].items():
        members = ensemble["per_attack"][name]
        attacked, seconds = ensemble["attacked"][name], ensemble["seconds"][name]
        for member, result in members.items():
            cells = [f"{100 * result['noise'][noise_key(n)][metric]:.2f}" for n in noise_levels]
            n_attacked = sum(level[member] for level in attacked.values())
            took = sum(level[member] for level in seconds.values())
            lines.append(f"| {name} | {member} | " + " | ".join(cells)
                         + f" | {n_attacked} | {took:.1f} |")
        cells = [f"**{100 * entry['noise'][noise_key(n)][metric]:.2f}**" for n in noise_levels]
        first = ensemble["members"][0]
        total = sum(sum(level.values()) for level in seconds.values())
        alone = sum(level[first] for level in seconds.values())
        cost = f"{total / alone:.2f} x {first}" if alone > 0 else ""
        lines.append(f"| {name} | worst case | " + " | ".join(cells)
                     + f" | {sum(sum(level.values()) for level in attacked.values())} | "
                     + f"{total:.1f} ({cost}) |")
    return "\n".join(lines)


VOLUME = "volume"
"""The ``slice`` of a whole case in ``per_slice.csv``."""


def per_slice_rows(model: str, results: Dict[float, NoiseResult], class_names: Sequence[str]
                   ) -> List[dict]:
    """The rows of ``per_slice.csv``: one per (noise level, sample). ``dice_<class>`` and
    ``slice_dice`` in the evaluator's convention (1 for a class absent from both); a whole case
    (3D) reads ``volume`` in ``slice`` and has ``nnunet_dice_<class>`` too, nnU-Net's Dice
    (``nan`` for a class absent from both)."""
    rows = []
    for noise in sorted(results):
        r = results[noise]
        dice = r.per_class_dice
        nnunet = nnunet_metrics(r.tp, r.fp, r.fn)["Dice"]
        for i, (case, index) in enumerate(zip(r.cases, r.slices)):
            volume = int(index) == WHOLE_CASE
            row = {"model": model, "noise": noise_key(noise), "case": case,
                   "slice": VOLUME if volume else index,
                   "slice_dice": f"{r.slice_dice[i]:.6f}"}
            row.update({f"dice_{name}": f"{dice[i, c]:.6f}" for c, name in enumerate(class_names)})
            if volume:
                row.update({f"nnunet_dice_{name}": f"{nnunet[i, c]:.6f}"
                            for c, name in enumerate(class_names)})
            rows.append(row)
    return rows


SIZE_BREAKDOWN_FIELDS = ("model", "noise", "class", "bin", "objects", "object_dice",
                         "detected_fraction")
"""The columns of ``size_breakdown.csv``."""


def size_breakdown_rows(summary: dict) -> List[dict]:
    """The rows of ``size_breakdown.csv``: one per (model, noise level, class, size bin) of the
    levels with a ``size_breakdown`` (:func:`summarise`); ``object_dice`` and
    ``detected_fraction`` empty for a bin without objects."""
    def number(value) -> str:
        return "" if value is None else f"{value:.6f}"
    rows = []
    for model, entry in summary["models"].items():
        for noise, level in entry["noise"].items():
            for name, bins in level.get("size_breakdown", {}).items():
                for bin_name, cell in bins.items():
                    rows.append({"model": model, "noise": noise, "class": name, "bin": bin_name,
                                 "objects": cell["objects"],
                                 "object_dice": number(cell["object_dice"]),
                                 "detected_fraction": number(cell["detected_fraction"])})
    return rows


def size_breakdown_table(summary: dict, noise_levels: Sequence[float]) -> str:
    """Object Dice (and the detected share) per model, class and object-size bin, one column
    per noise level (``""`` when no level has a breakdown); bins without objects are left
    out."""
    keys = [noise_key(n) for n in noise_levels]
    header = "| model | class | object size (voxels) | objects | " \
             + " | ".join(f"noise {k}" for k in keys) + " |"
    lines = []
    for model, entry in summary["models"].items():
        levels = [entry["noise"].get(k, {}).get("size_breakdown") for k in keys]
        known = [level for level in levels if level]
        if not known:
            continue
        for name, bins in known[0].items():
            for bin_name, cell in bins.items():
                if not cell["objects"]:
                    continue
                cells = []
                for level in levels:
                    value = level[name][bin_name] if level else None
                    cells.append("" if value is None else
                                 f"{100 * value['object_dice']:.2f} "
                                 f"({100 * value['detected_fraction']:.0f})")
                lines.append(f"| {model} | {name} | {bin_name} | {cell['objects']} | "
                             + " | ".join(cells) + " |")
    if not lines:
        return ""
    caption = attack_caption(summary.get("config"))
    return "\n".join(
        [f"Object Dice (%) by ground-truth object size, pooled per bin, with the share of "
         f"objects detected (object Dice >= 0.5, %) in brackets"
         + (f", under {caption}" if caption else ""),
         "", "Each object is a connected component of one class; its Dice counts the predicted "
             "components that touch it (a false positive elsewhere does not lower it).",
         "", header, "|" + "---|" * (header.count("|") - 1)] + lines) + "\n"


def write_outputs(out: str, summary: dict, rows: List[dict], noise_levels: Sequence[float]) -> None:
    write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    buffer = io.StringIO()
    if rows:
        # Models of different datasets have different classes: one column per class name seen.
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    write_text(os.path.join(out, "per_slice.csv"), buffer.getvalue())
    for metric in ("tvdi", "adi"):
        write_text(os.path.join(out, f"{metric}.md"),
                   markdown_table(summary, metric, noise_levels))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SIZE_BREAKDOWN_FIELDS)
    writer.writeheader()
    writer.writerows(size_breakdown_rows(summary))
    write_text(os.path.join(out, "size_breakdown.csv"), buffer.getvalue())
    table = size_breakdown_table(summary, noise_levels)
    path = os.path.join(out, "size_breakdown.md")
    if table:
        write_text(path, table)
    elif os.path.isfile(path):  # results without object counts: no table of older ones
        os.remove(path)


MINIMAL_NOISE_FILES = ("minimal_noise.csv", "minimal_noise.md")
"""The minimal-noise outputs (``--minimal-noise``, :mod:`.minimal_noise`)."""


def write_minimal_noise(out: str, rows: Optional[List[dict]], table: Optional[str]) -> None:
    """Write ``minimal_noise.csv`` (``rows``) and ``minimal_noise.md`` (``table``); ``None``
    (a run without ``--minimal-noise``) removes those of an earlier run in ``out`` instead, so
    that they never sit beside results they were not computed with."""
    if rows is None:
        for name in MINIMAL_NOISE_FILES:
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["model", "case", "slice", "minimal_noise",
                                                "source", "censored"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(os.path.join(out, "minimal_noise.csv"), buffer.getvalue())
    write_text(os.path.join(out, "minimal_noise.md"), table or "")


def print_tables(output: str) -> None:
    """Print the TVDI and ADI tables of a finished evaluation in ``output`` (and its
    minimal-noise table, if any), and where it is."""
    for name in ("tvdi.md", "adi.md", "minimal_noise.md"):
        if name == "minimal_noise.md" and not os.path.isfile(os.path.join(output, name)):
            continue
        with open(os.path.join(output, name)) as f:
            print("\n" + f.read(), end="")
    print(f"\nresults in {os.path.abspath(output)}")
