"""``nnunet-ima-classify``: IMA and its baselines for image classification.

    nnunet-ima-classify train --dataset moons --method ima -o runs/moons_ima
    nnunet-ima-classify train --dataset moons --method adv --eps 0.3 -o runs/moons_adv0.3
    nnunet-ima-classify eval runs/moons_ce runs/moons_adv0.3 runs/moons_ima --norm linf -o tables
    nnunet-ima-classify margins runs/moons_ima
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_ima.classification.datasets import (DATASETS, FASHION_MNIST_DEFAULT_ROOT, MOONS_NOISE,
                                                DatasetSplits, load_dataset)
from nnunet_ima.classification.files import write_json, write_text
from nnunet_ima.classification.margins_report import DEFAULT_QUANTILE, margin_report
from nnunet_ima.classification.models import DEFAULT_MODEL, MODELS, build_model
from nnunet_ima.classification.robust_eval import (ATTACK_LOSSES, MASKING_THRESHOLD_POINTS,
                                                   PGD_WORST, WORST, auc_of, masking_warnings,
                                                   robust_accuracy)
from nnunet_ima.classification.spsa import SPSASettings
from nnunet_ima.classification.strong_attacks import (ATTACKS, StrongAttackSettings, caption,
                                                      check_attacks, settings_record)
from nnunet_ima.classification.settings import (BASELINE_METHODS, METHODS, PAPER_SETTINGS,
                                                TrainConfig)
from nnunet_ima.classification.training import CHECKPOINT_FORMAT, FINAL, Trainer, seed_everything
from nnunet_ima.errors import UserInputError, run_command
from nnunet_ima.help_format import DefaultsHelpFormatter
from nnunet_ima.io import check_output_folder
from nnunet_ima.margins import MarginStore

# Below this many parameters a network's matrix products are too small for intra-op threads to
# pay off; on a busy CPU the threads' synchronisation made the moons MLP 30x slower.
SMALL_MODEL_PARAMETERS = 200_000


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device {name!r} is not a device name; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda asked but no CUDA device is available; use --device cpu")
    return device


def _set_threads(requested: Optional[int], model: torch.nn.Module) -> None:
    if requested is not None:
        if requested < 1:
            raise UserInputError(f"--num-threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
    elif sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--num-threads", type=int,
                   help="CPU threads of torch (default: torch's, 1 for networks under "
                        f"{SMALL_MODEL_PARAMETERS} parameters)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------- train
def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a classifier (ce, adv, ima or a baseline)",
                       formatter_class=DefaultsHelpFormatter,
                       description="Train with clean cross-entropy (ce), vanilla PGD adversarial "
                                   "training (adv), IMA, or the baselines trades, mma, ddn, fat, "
                                   "gairat. Defaults are the paper's settings of the dataset.")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="the dataset to train on")
    p.add_argument("--method", default="ima", choices=METHODS, help="the training method")
    p.add_argument("-o", "--output", required=True,
                   help="run folder; a folder holding a checkpoint of the same settings is resumed")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const=True,
                        help="require a checkpoint in -o and continue it")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                        help="refuse to continue a checkpoint in -o")
    add_training_options(p)


def add_training_options(p: argparse.ArgumentParser, batch_option: str = "--batch-size") -> None:
    """The training settings shared by `train` and `compare` (all but dataset, method and
    output folder). ``batch_option``: the name of the training batch size (`compare` calls it
    ``--train-batch-size``: there ``--batch-size`` is the evaluation's, as in `eval`)."""
    p.add_argument("--data-root", help="dataset folder (fashion-mnist: default "
                                       f"{FASHION_MNIST_DEFAULT_ROOT}; svhn, cifar10, covid-ct: required)")
    p.add_argument("--model", choices=sorted(MODELS), help="default: the paper's model of the dataset")
    p.add_argument("--epochs", type=int, help="default: the paper's (moons 30, fashion-mnist 60, ...)")
    p.add_argument(batch_option, dest="batch_size", type=int,
                   help="training batch size (default: the paper's, 128; covid-ct 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="initialisation, sample order, attack starts")
    p.add_argument("--data-seed", type=int, default=0,
                   help="validation hold-out, COVID-19 split and Moons points")
    p.add_argument("--norm", default="l2", choices=("l2", "linf"), help="attack norm in training")
    p.add_argument("--eps", type=float,
                   help="adv: the fixed PGD budget (required); trades, mma (its d_max), ddn (its "
                        "max norm), fat, gairat: the training budget (default: the dataset's "
                        "eps_max, as in the paper's comparison)")
    p.add_argument("--pgd-steps", type=int, default=20, help="PGD iterations in training")
    p.add_argument("--pgd-alpha", type=float, default=4.0,
                   help="PGD step = alpha * eps / steps (4: the ball is swept 4 times; "
                        "default %(default)s)")
    p.add_argument("--eps-max", type=float, help="ima: the largest margin (default: the paper's)")
    p.add_argument("--delta", type=float, help="ima: margin expansion step (default eps_max / epochs)")
    p.add_argument("--beta", type=float, default=0.5, help="ima: weight of the boundary-point loss")
    p.add_argument("--binary-steps", type=int, default=10, help="ima: bisection steps of BPGD")
    p.add_argument("--margin-update", default="average", choices=("average", "replace"),
                   help="ima: a crossed sample's margin becomes (d + E) / 2 or d")
    p.add_argument("--on-clean-wrong", default="shrink", choices=("shrink", "reset"),
                   help="ima: a misclassified sample's margin is halved, or reset to delta")
    p.add_argument("--clip-min", default="zero", choices=("zero", "delta"),
                   help="ima: clip margins to [0, eps_max] or [delta, eps_max]")
    p.add_argument("--trades-beta", type=float, default=6.0,
                   help="trades: weight of the KL term")
    p.add_argument("--mma-clean-weight", type=float, default=1 / 3,
                   help="mma: weight of the whole batch's clean loss (default 1/3)")
    p.add_argument("--ddn-steps", type=int, default=100, help="ddn: DDN iterations")
    p.add_argument("--ddn-gamma", type=float, default=0.05,
                   help="ddn: norm change per iteration")
    p.add_argument("--gairat-lambda", type=float, default=-1.0,
                   help="gairat: lambda of the weight function")
    p.add_argument("--gairat-begin-epoch", type=int,
                   help="gairat: first epoch (0-based) with reweighting (default: half the epochs)")
    p.add_argument("--max-train", type=int, help="train on the first N training samples only")
    p.add_argument("--moons-noise", type=float, default=MOONS_NOISE,
                   help="make_moons noise")
    p.add_argument("--save-every", type=int, default=0,
                   help="also keep checkpoint_epoch_N.pt every N epochs (default: never)")
    _common(p)


def _data_root(dataset: str, given: Optional[str]) -> Optional[str]:
    if given:
        return os.path.abspath(given)
    if dataset == "fashion-mnist":
        if not os.path.isdir(FASHION_MNIST_DEFAULT_ROOT):
            raise UserInputError(f"fashion-mnist: no --data-root and {FASHION_MNIST_DEFAULT_ROOT} "
                                 f"does not exist; `apt-get install dataset-fashion-mnist` or pass "
                                 f"--data-root with the four IDX files")
        return FASHION_MNIST_DEFAULT_ROOT
    return None


def config_from_args(args) -> TrainConfig:
    """The run's :class:`TrainConfig`: the options given, the paper's settings for the rest."""
    paper = PAPER_SETTINGS[args.dataset]
    return TrainConfig(
        dataset=args.dataset, model=args.model or DEFAULT_MODEL[args.dataset], method=args.method,
        epochs=args.epochs if args.epochs is not None else paper.epochs,
        batch_size=args.batch_size if args.batch_size is not None else paper.batch_size,
        lr=args.lr, seed=args.seed, data_seed=args.data_seed, norm=args.norm,
        pgd_steps=args.pgd_steps, pgd_alpha=args.pgd_alpha,
        eps=_training_eps(args, paper.eps_max),
        eps_max=(args.eps_max if args.eps_max is not None else paper.eps_max)
        if args.method == "ima" else None,
        delta=args.delta, beta=args.beta, binary_steps=args.binary_steps,
        margin_update=args.margin_update, on_clean_wrong=args.on_clean_wrong,
        clip_min=args.clip_min, max_train=args.max_train,
        data_root=_data_root(args.dataset, args.data_root),
        moons_noise=args.moons_noise if args.dataset == "moons" else MOONS_NOISE,
        trades_beta=args.trades_beta, mma_clean_weight=args.mma_clean_weight,
        ddn_steps=args.ddn_steps, ddn_gamma=args.ddn_gamma, gairat_lambda=args.gairat_lambda,
        gairat_begin_epoch=args.gairat_begin_epoch).validate()


def _training_eps(args, paper_eps_max: float) -> Optional[float]:
    """``--eps`` of adv (no default) and of the baselines (default: the paper's eps_max)."""
    if args.method == "adv":
        return args.eps
    if args.method in BASELINE_METHODS:
        return args.eps if args.eps is not None else paper_eps_max
    return None


def _split_path(folder: str, dataset: str) -> Optional[str]:
    return os.path.join(folder, "covid_split.json") if dataset == "covid-ct" else None


def run_train(args) -> int:
    check_output_folder(args.output, "-o/--output")
    if args.save_every < 0:
        raise UserInputError(f"--save-every must be >= 0, got {args.save_every}")
    config = config_from_args(args)
    device = _device(args.device)
    data = load_dataset(config.dataset, config.data_root, config.data_seed,
                        _split_path(args.output, config.dataset), config.moons_noise)
    seed_everything(config.seed)
    model = build_model(config.model, data.num_classes, data.input_shape)
    _set_threads(args.num_threads, model)
    trainer = Trainer(config, data, model, args.output, device, args.save_every,
                      progress=not args.no_progress)
    history = trainer.run(resume=args.resume)
    last = history[-1]
    print(f"final: train_acc {last['train_acc']:.4f} val_acc {last['val_acc']:.4f} -> "
          f"{os.path.join(args.output, FINAL)}")
    return 0


# ----------------------------------------------------------------------------------- eval
def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="robust accuracy under 100-PGD (cross-entropy and margin "
                                    "loss), optionally APGD and SPSA",
                       formatter_class=DefaultsHelpFormatter,
                       description="The paper's evaluation: per noise level, 100-step PGD (step "
                                   "noise/10, random start) maximising the cross-entropy and, "
                                   "separately, the margin loss; optionally also AutoAttack's "
                                   "APGD-CE / APGD-DLR (torchattacks) and the gradient-free SPSA. "
                                   "A test sample is robust only if it is classified correctly "
                                   "and every attack fails. A warning flags noise levels where "
                                   "PGD is more than 2 points above a stronger attack (gradient "
                                   "masking).")
    p.add_argument("runs", nargs="+", help="run folders written by `train`")
    p.add_argument("--norm", default="l2", choices=("l2", "linf"), help="attack norm")
    add_attack_options(p)
    p.add_argument("--batch-size", type=int, default=500, help="test samples per attack batch")
    p.add_argument("--seed", type=int, default=0, help="random starts of the attacks")
    p.add_argument("-o", "--output", metavar="FOLDER",
                   help="also write the markdown table to FOLDER/table_<norm>.md (created if "
                        "missing; each run's own results are always in RUN/eval_<norm>.json)")
    _common(p)


def add_attack_options(p: argparse.ArgumentParser) -> None:
    """The attack settings shared by `eval` and `compare`."""
    p.add_argument("--noise", type=float, nargs="+",
                   help="noise levels (default: the paper's for the dataset, e.g. moons 0 0.05 ... 0.3)")
    p.add_argument("--steps", type=int, default=100, help="PGD and APGD iterations")
    p.add_argument("--attacks", nargs="+", default=list(ATTACK_LOSSES), choices=list(ATTACKS),
                   help="attacks whose worst case is reported: ce, margin (PGD losses), apgd-ce, "
                        "apgd-dlr (>= 3 classes; both need torchattacks), spsa")
    p.add_argument("--apgd-restarts", type=int, default=1, help="APGD random restarts")
    spsa_defaults = SPSASettings()
    p.add_argument("--spsa-iterations", type=int, default=spsa_defaults.iterations,
                   help="SPSA Adam steps")
    p.add_argument("--spsa-samples", type=int, default=spsa_defaults.samples,
                   help="SPSA Rademacher directions per step, two forward passes each")
    p.add_argument("--spsa-delta", type=float, default=spsa_defaults.delta,
                   help="SPSA finite-difference size in input units")
    p.add_argument("--max-samples", type=int, help="evaluate the first N test samples")


def load_run(folder: str, device: torch.device) -> Tuple[TrainConfig, dict]:
    """The config and the final weights of a run folder (checked, nothing built yet)."""
    path = os.path.join(folder, FINAL)
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: train the run first (`nnunet-ima-classify "
                             f"train ... -o {folder}`)")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserInputError(f"{path} cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"{path} is not a model of nnunet-ima-classify")
    return TrainConfig.from_dict(state["config"]), state["model"]


def _check_eval_args(args) -> None:
    if args.noise is not None and any(not n >= 0 for n in args.noise):
        raise UserInputError(f"--noise levels must be >= 0, got {args.noise}")
    if args.steps < 1:
        raise UserInputError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 1:
        raise UserInputError(f"--max-samples must be >= 1, got {args.max_samples}")
    for option in ("apgd_restarts", "spsa_iterations", "spsa_samples"):
        if getattr(args, option) < 1:
            raise UserInputError(f"--{option.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(args, option)}")
    if not args.spsa_delta > 0:
        raise UserInputError(f"--spsa-delta must be > 0, got {args.spsa_delta}")


def markdown_table(rows: List[Tuple[str, dict]], norm: str, steps: int, attacks: Sequence[str]) -> str:
    """One row per run, one column per noise level (robust accuracy in %), then the AUC.

    The caption names the attacks run; a cell where PGD was more than 2 points above a stronger
    attack (``report["warnings"]``) carries a footnote mark ``[^k]`` explained below the table.
    """
    levels = sorted({float(n) for _, report in rows for n in report["noise"]})
    header = "| run | n | " + " | ".join(f"{norm.upper()} {n:g}" for n in levels) + " | AUC |"
    lines = [f"Robust accuracy (%), worst case of: {caption(attacks, steps)}",
             "", header, "|---|---:|" + "---:|" * (len(levels) + 1)]
    notes = []
    for name, report in rows:
        flagged = {f"{w['noise']:g}": w for w in report.get("warnings", [])}
        cells = []
        for n in levels:
            key = f"{n:g}"
            cell = f"{100 * report['noise'][key]:.2f}" if key in report["noise"] else ""
            if key in flagged:
                notes.append(flagged[key]["message"])
                cell += f" [^{len(notes)}]"
            cells.append(cell)
        auc = f"{100 * report['auc']:.2f}" if report["auc"] is not None else ""
        lines.append(f"| {name} | {report['n']} | " + " | ".join(cells) + f" | {auc} |")
    if notes:
        lines.append("")
        lines.extend(f"[^{k}]: {note}" for k, note in enumerate(notes, start=1))
    return "\n".join(lines) + "\n"


def _warning_message(run: str, norm: str, steps: int, pgd_losses: Sequence[str], w: dict) -> str:
    return (f"run {run}, {norm.upper()} noise {w['noise']:g}: {steps}-PGD "
            f"({', '.join(pgd_losses)}) {100 * w['pgd']:.2f} % is {w['points']:.2f} points above "
            f"{ATTACKS[w['attack']].label} {100 * w['accuracy']:.2f} % (more than "
            f"{MASKING_THRESHOLD_POINTS:g}): PGD's gradients may be masked; trust the stronger "
            f"attack")


def check_eval_output(folder: Optional[str]) -> None:
    """``eval -o`` is a folder, as everywhere else; until version 0.1 it was the table's file,
    so a path ending in ``.md`` is refused with the new meaning rather than made a folder."""
    if folder is None:
        return
    if folder.endswith(".md"):
        raise UserInputError(f"-o {folder}: -o of eval is now a folder, and the table is written "
                             f"into it as table_<norm>.md; give a folder, e.g. -o "
                             f"{os.path.dirname(folder) or '.'}")
    check_output_folder(folder, "-o/--output")


def run_eval(args) -> int:
    _check_eval_args(args)
    check_eval_output(args.output)
    rows = evaluate_runs(args.runs, args)
    table = markdown_table(rows, args.norm, args.steps, args.attacks)
    print(table)
    if args.output:
        path = os.path.join(args.output, f"table_{args.norm}.md")
        write_text(path, table)
        print(f"table in {path}")
    return 0


def attack_settings(args) -> StrongAttackSettings:
    """APGD and SPSA settings from the `eval` options."""
    return StrongAttackSettings(apgd_restarts=args.apgd_restarts, spsa=SPSASettings(
        iterations=args.spsa_iterations, samples=args.spsa_samples, delta=args.spsa_delta))


def evaluate_runs(folders: Sequence[str], args) -> List[Tuple[str, dict]]:
    """Attack the final model of every run folder as ``args`` (the `eval` options) say; writes
    ``eval_<norm>.json`` into each folder and returns ``(run name, report)`` per folder."""
    device = _device(args.device)
    settings = attack_settings(args)
    # Every folder, its data and the attacks it can take are checked before any attack runs,
    # so a typo in the last one (or apgd-dlr on 2 classes) wastes nothing.
    runs = [(folder, *load_run(folder, device)) for folder in folders]
    datasets: Dict[tuple, DatasetSplits] = {}
    for folder, config, _ in runs:
        key = (config.dataset, config.data_root, config.data_seed, config.moons_noise)
        if key not in datasets:
            datasets[key] = load_dataset(config.dataset, config.data_root, config.data_seed,
                                         _split_path(folder, config.dataset), config.moons_noise)
        check_attacks(args.attacks, datasets[key].num_classes,
                      where=f"{folder} ({config.dataset})")
    pgd_losses = [a for a in args.attacks if a in ATTACK_LOSSES]
    rows = []
    for folder, config, weights in runs:
        data = datasets[(config.dataset, config.data_root, config.data_seed, config.moons_noise)]
        model = build_model(config.model, data.num_classes, data.input_shape)
        model.load_state_dict(weights)
        model = model.to(device).eval()
        _set_threads(args.num_threads, model)
        noise = sorted(set(args.noise if args.noise is not None else PAPER_SETTINGS[config.dataset].noise))
        x, y = data.x_test, data.y_test
        if args.max_samples:
            x, y = x[:args.max_samples], y[:args.max_samples]
        result = robust_accuracy(model, x, y, noise, args.norm, args.steps, args.attacks,
                                 data.clamp, args.batch_size, args.seed, device,
                                 progress=not args.no_progress, settings=settings)
        name = os.path.basename(os.path.normpath(folder))
        warnings = masking_warnings(result, args.attacks)
        for w in warnings:
            w["message"] = _warning_message(name, args.norm, args.steps, pgd_losses, w)
            print(f"nnunet-ima-classify eval: warning: {w['message']}", file=sys.stderr)
        report = {"noise": {f"{n:g}": result[WORST][n] for n in noise}, "auc": auc_of(result[WORST]),
                  "attacks": list(args.attacks), "caption": caption(args.attacks, args.steps),
                  "n": len(x), "norm": args.norm, "steps": args.steps, "step_size": "noise / 10",
                  "seed": args.seed, "max_samples": args.max_samples,
                  "batch_size": args.batch_size, "attack_settings": settings_record(args.attacks, args.steps,
                                                                        settings),
                  "per_attack": {a: {f"{n:g}": result[a][n] for n in noise} for a in args.attacks},
                  "warnings": warnings}
        if PGD_WORST in result:
            report["pgd_worst"] = {f"{n:g}": result[PGD_WORST][n] for n in noise}
        write_json(os.path.join(folder, f"eval_{args.norm}.json"), report)
        rows.append((name, report))
    return rows


# -------------------------------------------------------------------------------- margins
def add_margins_parser(sub) -> None:
    p = sub.add_parser("margins", help="the margin distribution of an IMA run and the eps it suggests",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("run", help="an IMA run folder")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help="suggested eps = this quantile of the margins in [delta, eps_max)")


def run_margins(args) -> int:
    path = os.path.join(args.run, "margins.json")
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: margins are written by IMA runs "
                             f"(train --method ima)")
    if not 0 < args.quantile < 1:
        raise UserInputError(f"--quantile must lie in (0, 1), got {args.quantile}")
    try:
        with open(path) as f:
            store = MarginStore.from_state_dict(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path} is not a margin file ({e})") from None
    values = store.values()
    if values.size == 0:
        raise UserInputError(f"{path} holds no margins yet (no epoch finished)")
    print(margin_report(values, store.eps_max, store.delta, args.quantile))
    return 0


# ----------------------------------------------------------------------------------- main
def _version() -> str:
    try:
        return importlib.metadata.version("nnunet-ima")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-ima-classify",
                                     formatter_class=DefaultsHelpFormatter,
                                     description="IMA, vanilla adversarial and clean training and "
                                                 "robustness evaluation for image classification")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_margins_parser(sub)
    # compare builds on this module's train and eval, so it is imported here, not at the top
    from nnunet_ima.classification.compare import add_compare_parser
    add_compare_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input: one message, exit code 2; Ctrl-C: exit code 130 (`train` and `compare`
    resume from their checkpoints when the same command is run again)."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    from nnunet_ima.classification.compare import run_compare
    commands = {"train": run_train, "eval": run_eval, "margins": run_margins,
                "compare": run_compare}
    try:
        return run_command(f"nnunet-ima-classify {args.command}",
                           lambda: commands[args.command](args))
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (or a test)


if __name__ == "__main__":
    sys.exit(main())
