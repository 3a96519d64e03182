"""``nnunet-ima-eval``: TVDI and ADI of trained nnU-Net models under 100-step PGD.

Examples::

    nnunet-ima-eval -d 2 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerAdv_eps15 nnUNetTrainerIMA \\
        --noise 0 5 15 25 -o robustness_heart
    nnunet-ima-eval -m $nnUNet_results/Dataset002_Heart/nnUNetTrainerIMA__nnUNetPlans__2d \\
        --images imagesTs --labels labelsTs -o robustness_heart_ts

Outputs in ``-o OUT``: ``summary.json``, ``per_slice.csv``, ``tvdi.md``, ``adi.md``,
``curves.png``, ``examples.png``, and ``parts/`` (one file per finished (model, noise level):
a rerun with the same arguments resumes from them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet_paths import dataset_name, require_folder

from nnunet_ima.evaluation.models import LoadedModel, load_model
from nnunet_ima.evaluation.plots import plot_curves, plot_examples
from nnunet_ima.evaluation.preflight import preflight
from nnunet_ima.evaluation.report import (CONFIG_FILENAME, atomic_write_text, load_part,
                                          part_path, per_slice_rows, save_part, summarise,
                                          write_outputs)
from nnunet_ima.evaluation.robustness import (ATTACK_LOSSES, AttackSettings, NoiseResult,
                                              attack_loss, evaluate_noise)
from nnunet_ima.evaluation.samples import (SliceSample, cases_from_source, limit_slices,
                                           load_preprocessed_slices, load_raw_slices)

DEFAULT_NOISE = (0.0, 5.0, 15.0, 25.0)  # the paper's Heart levels (METHOD section 6)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-ima-eval",
        description="Attack trained nnU-Net 2D models with PGD at several noise levels and "
                    "report TVDI / ADI tables (Total Voxel Dice Index, Average Dice Index).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    models = p.add_argument_group("models (nnU-Net names, or folders with -m)")
    models.add_argument("-d", "--dataset", help="dataset id or name, e.g. 2 or Dataset002_Heart")
    models.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainer"],
                        help="trainer names; one model per trainer")
    models.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    models.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration")
    models.add_argument("-m", "--model-folders", nargs="+", metavar="FOLDER",
                        help="model folders (.../Trainer__Plans__2d) instead of -d/-tr/-p/-c")
    models.add_argument("-f", "--fold", type=int, default=0, help="fold")
    models.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"))
    data = p.add_argument_group("test slices")
    data.add_argument("--cases", nargs="+", default=["test"], metavar="CASE",
                      help="'test' (test_cases.json of `nnunet-ima split`), 'val' (the fold's "
                           "validation cases) or case identifiers")
    data.add_argument("--images", help="raw test images folder (imagesTs), preprocessed with the "
                                       "model's plans; needs --labels")
    data.add_argument("--labels", help="raw test labels folder (labelsTs)")
    data.add_argument("--include-empty", action="store_true",
                      help="also evaluate slices without foreground in the ground truth")
    data.add_argument("--max-slices", type=int, help="evaluate at most this many slices (seeded)")
    attack = p.add_argument_group("attack")
    attack.add_argument("--noise", type=float, nargs="+", default=list(DEFAULT_NOISE),
                        help="noise levels (0 = clean), in z-score units")
    attack.add_argument("--norm", default="l2", choices=("l2", "linf"))
    attack.add_argument("--steps", type=int, default=100, help="PGD iterations")
    attack.add_argument("--alpha", type=float, default=5.0,
                        help="step scale: each step is alpha * noise / steps")
    attack.add_argument("--no-random-start", action="store_true", help="start PGD at the input")
    attack.add_argument("--attack-loss", default="dc_ce", choices=ATTACK_LOSSES,
                        help="loss maximised: nnU-Net's Dice + CE, or CE")
    p.add_argument("--batch-size", type=int, default=16, help="slices per attack batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="discard results in OUTPUT made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda asked but no CUDA device is available; use --device cpu")
    if not args.model_folders and not args.dataset:
        raise UserInputError("name the models: -d DATASET -tr TRAINER ... or -m FOLDER ...")


def _model_folders(args: argparse.Namespace) -> List[str]:
    if args.model_folders:
        return [os.path.abspath(f) for f in args.model_folders]
    results = require_folder("nnUNet_results")
    name = dataset_name(args.dataset)
    return [os.path.join(results, name, f"{t}__{args.plans}__{args.configuration}")
            for t in args.trainers]


def _samples(model: LoadedModel, args: argparse.Namespace) -> List[SliceSample]:
    if args.images:
        cases = None if args.cases == ["test"] else args.cases
        samples = load_raw_slices(args.images, args.labels, model.plans, model.configuration,
                                  model.dataset_json, args.include_empty, cases)
    else:
        folder = os.path.join(require_folder("nnUNet_preprocessed"), model.dataset_name)
        cases = cases_from_source(folder, args.cases, args.fold)
        samples = load_preprocessed_slices(folder, model.data_identifier, cases, args.include_empty)
    if not samples:
        raise UserInputError("no test slices: the cases have no foreground (use --include-empty)")
    return limit_slices(samples, args.max_slices, args.seed)


def _run_config(args: argparse.Namespace, folders: Sequence[str], noise: Sequence[float],
                settings: AttackSettings) -> dict:
    return {"models": list(folders), "fold": args.fold, "checkpoint": args.checkpoint,
            "cases": args.cases, "images": args.images, "labels": args.labels,
            "include_empty": args.include_empty, "max_slices": args.max_slices,
            "noise": list(noise), "norm": settings.norm, "steps": settings.steps,
            "alpha": settings.alpha, "random_start": settings.random_start,
            "attack_loss": settings.loss, "seed": settings.seed}


def _prepare_output(out: str, config: dict, overwrite: bool) -> None:
    path = os.path.join(out, CONFIG_FILENAME)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != config:
            if not overwrite:
                changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise UserInputError(f"{out} holds results made with other settings ({changed}); "
                                     f"choose another -o or pass --overwrite")
            shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(path, json.dumps(config, indent=2))


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation described by ``args``; returns the summary."""
    _check_args(args)
    noise = sorted(set(float(n) for n in args.noise))
    settings = AttackSettings(norm=args.norm, steps=args.steps, alpha=args.alpha,
                              random_start=not args.no_random_start, loss=args.attack_loss,
                              batch_size=args.batch_size, seed=args.seed)
    device = torch.device(args.device)
    folders = _model_folders(args)
    models = [load_model(f, args.fold, args.checkpoint, device, name=os.path.basename(f).split("__")[0])
              for f in folders]
    if len({m.name for m in models}) != len(models):  # same trainer, other plans or datasets
        for m in models:
            m.name = os.path.basename(m.folder)
    samples = {m.name: _samples(m, args) for m in models}
    for m in models:
        first = samples[m.name][0]
        same_shape = [s for s in samples[m.name] if s.image.shape == first.image.shape]
        batch = same_shape[: settings.batch_size]
        x = torch.from_numpy(np.stack([s.image for s in batch])).to(device)
        y = torch.from_numpy(np.stack([s.label for s in batch])[:, None].astype(np.int64)).to(device)
        preflight(m.name, m.network, x, y, attack_loss(settings.loss, m.ignore_label))
    # Only now, with every input checked, does anything get written.
    config = _run_config(args, folders, noise, settings)
    _prepare_output(args.output, config, args.overwrite)

    todo = [(m, n) for m in models for n in noise
            if not os.path.isfile(part_path(args.output, m.name, n))]
    total = sum(len(samples[m.name]) for m, _ in todo)
    results: Dict[str, Dict[float, NoiseResult]] = {m.name: {} for m in models}
    with tqdm(total=total, desc="attacking slices", unit="slice",
              disable=args.no_progress or total == 0) as bar:
        for m in models:
            for n in noise:
                path = part_path(args.output, m.name, n)
                if os.path.isfile(path):
                    results[m.name][n] = load_part(path)
                    continue
                bar.set_postfix_str(f"{m.name} noise {n:g}")
                result = evaluate_noise(m, samples[m.name], n, settings, device, bar)
                save_part(path, result)
                results[m.name][n] = result

    class_names = _class_names(models[0])
    summary = {"config": config,
               "models": {m.name: summarise(results[m.name], class_names) for m in models}}
    rows = [r for m in models for r in per_slice_rows(m.name, results[m.name], class_names)]
    write_outputs(args.output, summary, rows, noise)
    plot_curves(summary, noise, os.path.join(args.output, "curves.png"))
    plot_examples(results, noise, os.path.join(args.output, "examples.png"))
    return summary


def _class_names(model: LoadedModel) -> List[str]:
    labels = model.dataset_json.get("labels", {})
    by_value = {int(v): k for k, v in labels.items() if isinstance(v, int)}
    return [by_value.get(c, f"class{c}") for c in range(1, model.num_classes)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except UserInputError as e:
        print(f"nnunet-ima-eval: error: {e}", file=sys.stderr)
        return 2
    for metric in ("tvdi", "adi"):
        with open(os.path.join(args.output, f"{metric}.md")) as f:
            print("\n" + f.read(), end="")
    print(f"\nresults in {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
