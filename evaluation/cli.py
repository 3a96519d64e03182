"""``nnunet-ima-eval``: TVDI and ADI of trained nnU-Net models under 100-step PGD (or SegPGD, APGD).

Examples::

    nnunet-ima-eval -d 2 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerAdv_eps15 nnUNetTrainerIMA \\
        --noise 0 5 15 25 -o robustness_heart
    nnunet-ima-eval -m $nnUNet_results/Dataset002_Heart/nnUNetTrainerIMA__nnUNetPlans__2d \\
        --images imagesTs --labels labelsTs -o robustness_heart_ts
    nnunet-ima-eval -d 2 -tr nnUNetTrainerIMA --attack apgd -o robustness_heart_apgd
    nnunet-ima-eval -d 2 -tr nnUNetTrainerIMA -f 0 1 2 3 4 -chk checkpoint_best.pth -device cuda \\
        -o robustness_heart_folds

nnU-Net's spellings ``-device``, ``-chk checkpoint_best.pth`` and ``-f`` with several folds
work too; each fold is one model (``nnUNetTrainerIMA_fold1``). A case that a model's fold
trained on is refused (:mod:`.training_cases`) unless ``--allow-train-cases``, and then the
tables say so.

Outputs in ``-o OUT``: ``summary.json``, ``per_slice.csv``, ``tvdi.md``, ``adi.md``,
``curves.png``, ``examples.png``, and ``parts/`` (one file per finished (model, noise level):
a rerun with the same arguments resumes from them).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima.errors import UserInputError, run_command
from nnunet_ima.help_format import DefaultsHelpFormatter
from nnunet_ima.io import check_output_folder
from nnunet_ima.nnunet.paths import dataset_name, require_folder

from nnunet_ima.evaluation.attacks import ATTACKS
from nnunet_ima.evaluation.models import LoadedModel, checkpoint_choice, load_model
from nnunet_ima.evaluation.plots import plot_curves, plot_examples
from nnunet_ima.evaluation.preflight import preflight
from nnunet_ima.evaluation.report import (CONFIG_FILENAME, atomic_write_text, load_part,
                                          noise_key, part_path, per_slice_rows, save_part,
                                          summarise, write_outputs)
from nnunet_ima.evaluation.robustness import (ATTACK_LOSSES, LEVEL_BATCHING, AttackSettings,
                                              NoiseResult,
                                              attack_loss, full_precision, iter_levels)
from nnunet_ima.evaluation.samples import (SliceSample, cases_from_source, limit_slices,
                                           load_preprocessed_slices, load_raw_slices,
                                           resolve_case_source, select_raw_cases)
from nnunet_ima.evaluation.training_cases import (parse_fold, refusal_message, trained_on,
                                                  training_cases)

DEFAULT_NOISE = (0.0, 5.0, 15.0, 25.0)  # the paper's Heart levels (METHOD section 6)


def _version() -> str:
    try:
        return importlib.metadata.version("nnunet-ima")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def _argument_type(parse):
    """An argparse ``type`` from a parser raising ``ValueError``, keeping its message."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-ima-eval",
        description="Attack trained nnU-Net 2D models with PGD (or SegPGD, APGD) at several noise "
                    "levels and report TVDI / ADI tables (Total Voxel Dice Index, Average Dice "
                    "Index).",
        formatter_class=DefaultsHelpFormatter)
    models = p.add_argument_group("models (nnU-Net names, or folders with -m)")
    models.add_argument("-d", "--dataset", help="dataset id or name, e.g. 2 or Dataset002_Heart")
    models.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainer"],
                        help="trainer names; one model per trainer")
    models.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    models.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration")
    models.add_argument("-m", "--model-folders", nargs="+", metavar="FOLDER",
                        help="model folders (.../Trainer__Plans__2d) instead of -d/-tr/-p/-c")
    # Single-dash spellings are nnU-Net's (nnUNetv2_predict); declared so that argparse does not
    # read -device as -d evice or -chk as -c hk.
    models.add_argument("-f", "--fold", nargs="+", type=_argument_type(parse_fold), default=[0],
                        metavar="FOLD",
                        help="folds (numbers and/or 'all'); with several, each fold is one model, "
                             "named TRAINER_foldK")
    models.add_argument("-chk", "--checkpoint", default="final",
                        type=_argument_type(checkpoint_choice),
                        help="final, best or latest, or nnU-Net's file name "
                             "(checkpoint_best.pth, ...)")
    data = p.add_argument_group("test slices")
    data.add_argument("--cases", nargs="+", metavar="CASE",
                      help="'test' (test_cases.json of `nnunet-ima split`), 'val' (the fold's "
                           "validation cases) and/or case identifiers, e.g. --cases test val; "
                           "default: 'test' when test_cases.json exists, else 'val'")
    data.add_argument("--allow-train-cases", action="store_true",
                      help="score cases that the model's fold trained on (refused otherwise); the "
                           "tables then name them")
    data.add_argument("--images", help="raw test images folder (imagesTs), preprocessed with the "
                                       "model's plans; needs --labels")
    data.add_argument("--labels", help="raw test labels folder (labelsTs)")
    data.add_argument("--include-empty", action="store_true",
                      help="also evaluate slices without foreground in the ground truth")
    data.add_argument("--max-slices", type=int, help="evaluate at most this many slices (seeded)")
    attack = p.add_argument_group("attack")
    attack.add_argument("--noise", type=float, nargs="+", default=list(DEFAULT_NOISE),
                        help="noise levels (0 = clean), in z-score units")
    attack.add_argument("--attack", default="pgd", choices=ATTACKS,
                        help="pgd: projected gradient ascent with a fixed step; segpgd: SegPGD "
                             "(Gu et al. 2022), PGD on a CE that shifts weight from correctly to "
                             "wrongly classified pixels over the steps; apgd: Auto-PGD (Croce & "
                             "Hein 2020), momentum and a per-slice step size halved when the loss "
                             "stalls, keeping each slice's highest-loss iterate")
    attack.add_argument("--norm", default="l2", choices=("l2", "linf"), help="all attacks")
    attack.add_argument("--steps", type=int, default=100,
                        help="iterations (gradient steps) of every attack")
    attack.add_argument("--alpha", type=float, default=5.0,
                        help="pgd, segpgd: each step is alpha * noise / steps (apgd adapts its "
                             "own step, starting at 2 * noise)")
    attack.add_argument("--no-random-start", action="store_true",
                        help="all attacks: start at the input instead of a seeded random point "
                             "of the ball")
    attack.add_argument("--attack-loss", default="dc_ce", choices=ATTACK_LOSSES,
                        help="pgd, apgd: loss maximised, nnU-Net's Dice + CE or CE (segpgd "
                             "maximises its own weighted CE)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per attack batch")
    p.add_argument("--level-batching", default="auto", choices=LEVEL_BATCHING,
                   help="attack a batch with fewer slices than --batch-size at several noise "
                        "levels at once (up to slices x levels = --batch-size); the counts are "
                        "those of one level at a time. auto: on GPUs only (CPUs gain nothing)")
    p.add_argument("-device", "--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0,
                   help="random starts of the attacks and the --max-slices draw")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (created if missing; a rerun resumes in it)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard results in OUTPUT made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _check_args(args: argparse.Namespace) -> None:
    bad = [n for n in args.noise if not (n >= 0) or n != n or n == float("inf")]
    if bad:
        raise UserInputError(f"noise levels must be finite and >= 0, got {bad}")
    if args.steps < 1:
        raise UserInputError(f"--steps must be >= 1, got {args.steps}")
    if not args.alpha > 0:
        raise UserInputError(f"--alpha must be > 0, got {args.alpha}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_slices is not None and args.max_slices < 1:
        raise UserInputError(f"--max-slices must be >= 1, got {args.max_slices}")
    if bool(args.images) != bool(args.labels):
        raise UserInputError("--images and --labels go together (labels are needed for Dice)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserInputError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda asked but no CUDA device is available; use --device cpu")
    if not args.model_folders and not args.dataset:
        raise UserInputError("name the models: -d DATASET -tr TRAINER ... or -m FOLDER ...")
    if args.model_folders and args.dataset:
        raise UserInputError("name the models either by -d/-tr/-p/-c or by -m FOLDER, not both")
    repeated = sorted({str(f) for f in args.fold if args.fold.count(f) > 1})
    if repeated:
        raise UserInputError(f"-f names fold {', '.join(repeated)} more than once")
    if args.images and args.cases and set(args.cases) & {"test", "val"}:
        raise UserInputError("--cases test/val select preprocessed cases; with --images give case "
                             "identifiers of the images folder, or no --cases for all of them")


def _model_folders(args: argparse.Namespace) -> List[str]:
    if args.model_folders:
        return [os.path.abspath(f) for f in args.model_folders]
    results = require_folder("nnUNet_results")
    name = dataset_name(args.dataset)
    return [os.path.join(results, name, f"{t}__{args.plans}__{args.configuration}")
            for t in args.trainers]


def _load_models(folders: Sequence[str], folds: Sequence, checkpoint: str,
                 device: torch.device) -> List[LoadedModel]:
    """One model per (folder, fold), named by its trainer (``Trainer_foldK`` with several folds),
    or by its folder where trainers repeat (same trainer, other plans or datasets)."""
    suffix = (lambda fold: f"_fold{fold}") if len(folds) > 1 else (lambda fold: "")
    models = [load_model(f, fold, checkpoint, device,
                         name=os.path.basename(os.path.normpath(f)).split("__")[0] + suffix(fold))
              for f in folders for fold in folds]
    if len({m.name for m in models}) != len(models):
        for m in models:
            m.name = os.path.basename(os.path.normpath(m.folder)) + suffix(m.fold)
    return models


def _case_source(model: LoadedModel, args: argparse.Namespace) -> List[str]:
    if args.images:
        return ["raw"]
    folder = os.path.join(require_folder("nnUNet_preprocessed"), model.dataset_name)
    return resolve_case_source(folder, args.cases)


def _cases_to_score(model: LoadedModel, args: argparse.Namespace) -> List[str]:
    """The case identifiers ``model`` is to be scored on (before slices without foreground and
    ``--max-slices`` thin them out)."""
    if args.images:
        return list(select_raw_cases(args.images, args.labels, model.dataset_json, args.cases))
    folder = os.path.join(require_folder("nnUNet_preprocessed"), model.dataset_name)
    return cases_from_source(folder, args.cases, model.fold)


def _training_cases(model: LoadedModel, args: argparse.Namespace) -> List[str]:
    """The cases ``model``'s fold trained on. Raw images can be scored without the preprocessed
    dataset; then the check cannot be made, which is said rather than hidden."""
    try:
        folder = os.path.join(require_folder("nnUNet_preprocessed"), model.dataset_name)
        return training_cases(folder, model.data_identifier, model.fold)
    except UserInputError as e:
        if not args.images:
            raise
        print(f"warning: {model.name}: cannot check whether the --images cases were training "
              f"cases ({e})", file=sys.stderr, flush=True)
        return []


def _check_training_cases(models: Sequence[LoadedModel], cases: Dict[str, List[str]],
                          args: argparse.Namespace) -> Dict[str, List[str]]:
    """Refuse to score a model on the cases its fold trained on, unless ``--allow-train-cases``;
    returns the training cases that will be scored, per model (empty unless allowed)."""
    overlap = trained_on(cases, {m.name: _training_cases(m, args) for m in models})
    if overlap and not args.allow_train_cases:
        raise UserInputError(refusal_message(overlap, {m.name: m.fold for m in models}))
    for name, hit in overlap.items():
        print(f"warning: {name} is scored on {len(hit)} case{'s' * (len(hit) != 1)} it trained "
              f"on ({', '.join(hit)}); the tables say so", file=sys.stderr, flush=True)
    return overlap


def _load_samples(model: LoadedModel, cases: List[str], args: argparse.Namespace
                  ) -> List[SliceSample]:
    if args.images:
        samples = load_raw_slices(args.images, args.labels, model.plans, model.configuration,
                                  model.dataset_json, args.include_empty, cases,
                                  model.ignore_label)
    else:
        folder = os.path.join(require_folder("nnUNet_preprocessed"), model.dataset_name)
        samples = load_preprocessed_slices(folder, model.data_identifier, cases, args.include_empty,
                                           model.ignore_label)
    if not samples:
        raise UserInputError("no test slices: the cases have no foreground (use --include-empty)")
    return limit_slices(samples, args.max_slices, args.seed)


def _samples_by_model(models: Sequence[LoadedModel], cases: Dict[str, List[str]],
                      args: argparse.Namespace) -> Dict[str, List[SliceSample]]:
    """The test slices of every model; models that read the same data share one copy."""
    cache: Dict[str, List[SliceSample]] = {}
    samples = {}
    for m in models:
        # Same preprocessed folder (or same plans for raw images) and cases -> the same slices;
        # folds differ in their validation cases.
        key = json.dumps([m.dataset_name, m.data_identifier, cases[m.name]] if not args.images else
                         [m.plans, m.configuration, m.dataset_json, cases[m.name]], sort_keys=True)
        if key not in cache:
            cache[key] = _load_samples(m, cases[m.name], args)
        samples[m.name] = cache[key]
    return samples


def _model_config(model: LoadedModel, args: argparse.Namespace, samples: List[SliceSample],
                  train_cases_scored: List[str]) -> dict:
    """A model's part of :func:`_run_config`. ``train_cases_scored`` (training cases scored under
    ``--allow-train-cases``) appears only when there are any, so folders written before it
    existed still resume."""
    entry = {"folder": model.folder, "checkpoint_sha256": model.checkpoint_sha256,
             "case_source": _case_source(model, args),
             "cases": list(dict.fromkeys(s.case for s in samples)),
             "n_slices": len(samples)}
    scored = set(entry["cases"])
    hit = [c for c in train_cases_scored if c in scored]  # all-background cases drop out
    if hit:
        entry["train_cases_scored"] = hit
    return entry


def _run_config(args: argparse.Namespace, models: Sequence[LoadedModel],
                samples: Dict[str, List[SliceSample]], noise: Sequence[float],
                settings: AttackSettings, train_cases_scored: Dict[str, List[str]]) -> dict:
    """Everything a result depends on; a rerun in the same folder must match it to resume.

    Besides the options this holds, per model, the checkpoint's digest and the test cases
    actually used, so that retrained weights or a new split are not mixed with old parts. The
    batch size is part of it because each batch draws its own random start. An option that
    does not apply to the attack (``alpha`` for apgd, ``attack_loss`` for segpgd) is ``None``.
    One fold is recorded as itself (``0``, as before ``-f`` took several), several as a list.
    """
    return {"models": {m.name: _model_config(m, args, samples[m.name],
                                             train_cases_scored.get(m.name, []))
                       for m in models},
            "fold": args.fold[0] if len(args.fold) == 1 else list(args.fold),
            "checkpoint": args.checkpoint,
            "images": args.images and os.path.abspath(args.images),
            "labels": args.labels and os.path.abspath(args.labels),
            "include_empty": args.include_empty, "max_slices": args.max_slices,
            "noise": list(noise), "attack": settings.attack, "norm": settings.norm,
            "steps": settings.steps,
            "alpha": None if settings.attack == "apgd" else settings.alpha,
            "random_start": settings.random_start,
            "attack_loss": None if settings.attack == "segpgd" else settings.loss,
            "seed": settings.seed,
            "batch_size": settings.batch_size}


OUTPUT_FILES = ("summary.json", "per_slice.csv", "tvdi.md", "adi.md", "curves.png", "examples.png")


def _existing_config(out: str, config: dict, overwrite: bool) -> bool:
    """Whether ``out`` holds results of this very configuration (to resume). Other settings are
    an error unless ``overwrite``. Reads only: nothing is written before every check passed."""
    path = os.path.join(out, CONFIG_FILENAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            old = json.load(f)
        if isinstance(old, dict):
            old.setdefault("attack", "pgd")  # folders written before --attack existed ran PGD
    except (OSError, ValueError) as e:
        if overwrite:
            return False
        raise UserInputError(f"cannot read {path} ({e}); pass --overwrite or choose another -o") \
            from None
    if old == config:
        return True
    if not overwrite:
        raise UserInputError(f"{out} holds results made with other settings (differences in: "
                             f"{', '.join(_differences(old, config))}); choose another -o or pass "
                             f"--overwrite")
    return False


def _differences(old, new, prefix: str = "") -> List[str]:
    """Dotted paths where two configurations differ, e.g. ``models.IMA.checkpoint_sha256``."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                paths += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return paths
    return [prefix.rstrip(".")]


def _prepare_output(out: str, config: dict, resume: bool) -> None:
    if not resume:  # other settings, or no config: old results must not survive
        shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
        for name in OUTPUT_FILES:
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, CONFIG_FILENAME), json.dumps(config, indent=2))


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation described by ``args``; returns the summary."""
    _check_args(args)
    check_output_folder(args.output, "-o/--output")  # before loading models and data
    noise = sorted(set(float(n) for n in args.noise))
    settings = AttackSettings(attack=args.attack, norm=args.norm, steps=args.steps,
                              alpha=args.alpha, random_start=not args.no_random_start,
                              loss=args.attack_loss, batch_size=args.batch_size, seed=args.seed,
                              level_batching=args.level_batching)
    device = torch.device(args.device)
    folders = _model_folders(args)
    if len(set(folders)) != len(folders):
        raise UserInputError(f"a model is named twice: {folders}")
    models = _load_models(folders, args.fold, args.checkpoint, device)
    cases = {m.name: _cases_to_score(m, args) for m in models}
    train_cases_scored = _check_training_cases(models, cases, args)
    samples = _samples_by_model(models, cases, args)
    for m in models:
        first = samples[m.name][0]
        same_shape = [s for s in samples[m.name] if s.image.shape == first.image.shape]
        batch = same_shape[: settings.batch_size]
        x = torch.from_numpy(np.stack([s.image for s in batch])).to(device)
        y = torch.from_numpy(np.stack([s.label for s in batch])[:, None].astype(np.int64)).to(device)
        # SegPGD maximises a (weighted) CE: check the gradient of the CE for it.
        loss = "ce" if settings.attack == "segpgd" else settings.loss
        preflight(m.name, m.network, x, y, attack_loss(loss, m.ignore_label))
    config = _run_config(args, models, samples, noise, settings, train_cases_scored)
    resume = _existing_config(args.output, config, args.overwrite)
    results: Dict[str, Dict[float, NoiseResult]] = {m.name: {} for m in models}
    if resume:
        for m in models:
            keys = [s.key for s in samples[m.name]]
            for n in noise:
                path = part_path(args.output, m.name, n)
                if not os.path.isfile(path):
                    continue
                try:
                    results[m.name][n] = load_part(path, keys)
                except UserInputError:
                    if not args.overwrite:
                        raise  # --overwrite recomputes it
    # Only now, with every input checked, does anything get written.
    _prepare_output(args.output, config, resume)
    for m in models:
        n_cases = len(config["models"][m.name]["cases"])
        print(f"{m.name}: {len(samples[m.name])} slices of {n_cases} case{'s' * (n_cases != 1)} "
              f"({' '.join(config['models'][m.name]['case_source'])})", flush=True)
    _report_reused(args.output, results, len(models) * len(noise))

    todo = [(m, [n for n in noise if n not in results[m.name]]) for m in models]
    todo = [(m, pending) for m, pending in todo if pending]
    total = sum(len(samples[m.name]) * len(pending) for m, pending in todo)
    packing = {m.name: Counter() for m in models}
    with tqdm(total=total, desc="attacking slices", unit="slice",
              disable=args.no_progress or total == 0) as bar:
        for m, pending in todo:
            bar.set_postfix_str(m.name)
            # A part per level as soon as the level is done (levels finish in order).
            for n, result in iter_levels(m, samples[m.name], pending, settings, device, bar,
                                         packing[m.name]):
                save_part(part_path(args.output, m.name, n), result)
                results[m.name][n] = result
    for name, count in packing.items():
        if count["packed"] or count["declined"]:
            batches = "batch" if count["packed"] == 1 else "batches"
            print(f"{name}: {count['packed']} attack {batches} held several noise levels"
                  + (f", {count['declined']} packs ran one level per batch (the kernels round "
                     f"differently at the larger batch size)" if count["declined"] else ""),
                  flush=True)

    summary = {"config": config,
               "models": {m.name: summarise(results[m.name], _class_names(m)) for m in models}}
    rows = [r for m in models for r in per_slice_rows(m.name, results[m.name], _class_names(m))]
    write_outputs(args.output, summary, rows, noise)
    plot_curves(summary, noise, os.path.join(args.output, "curves.png"))
    plot_examples(results, noise, os.path.join(args.output, "examples.png"))
    return summary


def _report_reused(out: str, results: Dict[str, Dict[float, NoiseResult]], total: int) -> None:
    """One line naming the (model, noise) results a resumed run took from ``out/parts`` rather
    than recomputing them (a resume is otherwise silent, and looks like a too-fast run)."""
    reused = {name: sorted(levels) for name, levels in results.items() if levels}
    count = sum(len(levels) for levels in reused.values())
    if count:
        listed = "; ".join(f"{name} at noise {' '.join(noise_key(n) for n in levels)}"
                           for name, levels in reused.items())
        print(f"resuming: reused {count} of {total} (model, noise) results from "
              f"{os.path.join(out, 'parts')}: {listed}", flush=True)


def _class_names(model: LoadedModel) -> List[str]:
    labels = model.dataset_json.get("labels", {})
    by_value = {int(v): k for k, v in labels.items() if isinstance(v, int)}
    return [by_value.get(c, f"class{c}") for c in range(1, model.num_classes)]


def _evaluate_and_print(args: argparse.Namespace) -> int:
    with full_precision():
        evaluate(args)
    for metric in ("tvdi", "adi"):
        with open(os.path.join(args.output, f"{metric}.md")) as f:
            print("\n" + f.read(), end="")
    print(f"\nresults in {os.path.abspath(args.output)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input: one message, exit code 2; Ctrl-C: exit code 130, and the same command resumes
    from the finished (model, noise) parts."""
    args = build_parser().parse_args(argv)
    return run_command("nnunet-ima-eval", lambda: _evaluate_and_print(args))


if __name__ == "__main__":
    sys.exit(main())
