"""``nnunet-ima-classify``: IMA and its baselines for image classification.

    nnunet-ima-classify train --dataset moons --method ima -o runs/moons_ima
    nnunet-ima-classify train --dataset moons --method adv --eps 0.3 -o runs/moons_adv0.3
    nnunet-ima-classify eval runs/moons_ce runs/moons_adv0.3 runs/moons_ima --norm linf -o tables
    nnunet-ima-classify margins runs/moons_ima
    nnunet-ima-classify compare --dataset moons --methods ce adv ima trades -o runs/moons_compare

This module parses the options and dispatches; the work is in ``runs`` (train, load),
``evaluate`` (attack run folders), ``tables`` and ``compare``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from nnunet_ima import installed_version
from nnunet_ima.classification.compare import compare, run_name
from nnunet_ima.classification.datasets import FASHION_MNIST_DEFAULT_ROOT, MOONS_NOISE
from nnunet_ima.classification.evaluate import (DEFAULT_BATCH_SIZE, DEFAULT_STEPS, EvalOptions,
                                                evaluate_runs)
from nnunet_ima.classification.margins_report import DEFAULT_QUANTILE, margin_report
from nnunet_ima.classification.models import DEFAULT_MODEL
from nnunet_ima.classification.robust_eval import ATTACK_LOSSES
from nnunet_ima.classification.runs import SMALL_MODEL_PARAMETERS, ExecutionOptions, train_run
from nnunet_ima.classification.settings import (BASELINE_METHODS, METHODS, PAPER_SETTINGS,
                                                TrainConfig)
from nnunet_ima.classification.spsa import SPSASettings
from nnunet_ima.classification.strong_attacks import ATTACKS, StrongAttackSettings
from nnunet_ima.classification.tables import markdown_table
from nnunet_ima.classification.training import FINAL
from nnunet_ima.classification.training_options import (add_config_options, config_values,
                                                        in_option_names)
from nnunet_ima.declared import InvalidSetting, add_option, field_default
from nnunet_ima.devices import add_device_argument, resolve_device
from nnunet_ima.errors import UserInputError, run_command
from nnunet_ima.help_format import DefaultsHelpFormatter
from nnunet_ima.io import check_output_folder, write_text
from nnunet_ima.margins import MarginStore
from nnunet_ima.norms import NORMS


def _common(p: argparse.ArgumentParser) -> None:
    add_device_argument(p)
    p.add_argument("--num-threads", type=int,
                   help="CPU threads of torch (default: torch's, 1 for networks under "
                        f"{SMALL_MODEL_PARAMETERS} parameters)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------- train
def add_train_options(p: argparse.ArgumentParser) -> None:
    add_option(p, TrainConfig, "dataset", required=True)
    add_option(p, TrainConfig, "method", default="ima")
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
    output folder), generated from :class:`TrainConfig` (:func:`add_config_options`).
    ``batch_option``: the name of the training batch size (`compare` calls it
    ``--train-batch-size``: there ``--batch-size`` is the evaluation's, as in `eval`)."""
    add_config_options(p, batch_option)
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
    """The run's :class:`TrainConfig`: the options given, the paper's settings for the rest.

    Raises:
        UserInputError: a value out of range, named by its option.
    """
    paper = PAPER_SETTINGS[args.dataset]
    values = dict(
        config_values(args), dataset=args.dataset, method=args.method,
        model=args.model or DEFAULT_MODEL[args.dataset],
        epochs=args.epochs if args.epochs is not None else paper.epochs,
        batch_size=args.batch_size if args.batch_size is not None else paper.batch_size,
        eps=_training_eps(args, paper.eps_max),
        eps_max=(args.eps_max if args.eps_max is not None else paper.eps_max)
        if args.method == "ima" else None,
        data_root=_data_root(args.dataset, args.data_root),
        moons_noise=args.moons_noise if args.dataset == "moons" else MOONS_NOISE)
    try:
        return TrainConfig.from_flat(values).validate()
    except InvalidSetting as e:
        raise UserInputError(in_option_names(e)) from None


def _training_eps(args, paper_eps_max: float) -> Optional[float]:
    """``--eps`` of adv (no default) and of the baselines (default: the paper's eps_max)."""
    if args.method == "adv":
        return args.eps
    if args.method in BASELINE_METHODS:
        return args.eps if args.eps is not None else paper_eps_max
    return None


def execution_from_args(args) -> ExecutionOptions:
    """The --device, --num-threads and --no-progress options."""
    return ExecutionOptions(device=resolve_device(args.device), num_threads=args.num_threads,
                            progress=not args.no_progress)


def run_train(args) -> int:
    check_output_folder(args.output, "-o/--output")
    if args.save_every < 0:
        raise UserInputError(f"--save-every must be >= 0, got {args.save_every}")
    config = config_from_args(args)
    last = train_run(config, args.output, execution_from_args(args), args.save_every,
                     resume=args.resume)
    print(f"final: train_acc {last['train_acc']:.4f} val_acc {last['val_acc']:.4f} -> "
          f"{os.path.join(args.output, FINAL)}")
    return 0


# ----------------------------------------------------------------------------------- eval
def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders written by `train`")
    p.add_argument("--norm", default=field_default(EvalOptions, "norm"), choices=NORMS,
                   help="attack norm")
    add_attack_options(p)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="test samples per attack batch")
    p.add_argument("--seed", type=int, default=field_default(EvalOptions, "seed"),
                   help="random starts of the attacks")
    p.add_argument("-o", "--output", metavar="FOLDER",
                   help="also write the markdown table to FOLDER/table_<norm>.md (created if "
                        "missing; each run's own results are always in RUN/eval_<norm>.json)")
    _common(p)


def add_attack_options(p: argparse.ArgumentParser) -> None:
    """The attack settings shared by `eval` and `compare`."""
    p.add_argument("--noise", type=float, nargs="+",
                   help="noise levels (default: the paper's for the dataset, e.g. moons 0 0.05 ... 0.3)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="PGD and APGD iterations")
    p.add_argument("--attacks", nargs="+", default=list(ATTACK_LOSSES), choices=list(ATTACKS),
                   help="attacks whose worst case is reported: ce, margin (PGD losses), apgd-ce, "
                        "apgd-dlr (>= 3 classes; both need torchattacks), spsa")
    p.add_argument("--apgd-restarts", type=int,
                   default=field_default(StrongAttackSettings, "apgd_restarts"),
                   help="APGD random restarts")
    spsa_defaults = SPSASettings()
    p.add_argument("--spsa-iterations", type=int, default=spsa_defaults.iterations,
                   help="SPSA Adam steps")
    p.add_argument("--spsa-samples", type=int, default=spsa_defaults.samples,
                   help="SPSA Rademacher directions per step, two forward passes each")
    p.add_argument("--spsa-delta", type=float, default=spsa_defaults.delta,
                   help="SPSA finite-difference size in input units")
    p.add_argument("--max-samples", type=int, help="evaluate the first N test samples")


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


def eval_options(args, norm: Optional[str] = None,
                 batch_size: Optional[int] = None) -> EvalOptions:
    """The `eval` options (checked); `compare` passes the norm and batch size of its own."""
    strong = StrongAttackSettings(apgd_restarts=args.apgd_restarts, spsa=SPSASettings(
        iterations=args.spsa_iterations, samples=args.spsa_samples, delta=args.spsa_delta))
    return EvalOptions(norm=norm or args.norm,
                       noise=None if args.noise is None else tuple(args.noise),
                       steps=args.steps, attacks=tuple(args.attacks),
                       batch_size=args.batch_size if batch_size is None else batch_size,
                       seed=args.seed, max_samples=args.max_samples, strong=strong)


def run_eval(args) -> int:
    options = eval_options(args)
    check_eval_output(args.output)
    rows = evaluate_runs(args.runs, options, execution_from_args(args))
    table = markdown_table(rows, options.norm, options.steps, options.attacks)
    print(table)
    if args.output:
        path = os.path.join(args.output, f"table_{options.norm}.md")
        write_text(path, table)
        print(f"table in {path}")
    return 0


# -------------------------------------------------------------------------------- margins
def add_margins_options(p: argparse.ArgumentParser) -> None:
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


# -------------------------------------------------------------------------------- compare
def add_compare_options(p: argparse.ArgumentParser) -> None:
    add_option(p, TrainConfig, "dataset", required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to train and compare (default: all, %(default)s)")
    p.add_argument("-o", "--output", required=True,
                   help="comparison folder: one run folder per method, tables and curves")
    # --batch-size is the evaluation's, as in `eval` (and in nnunet-ima-eval).
    add_training_options(p, batch_option="--train-batch-size")
    p.add_argument("--eval-norms", nargs="+", default=list(NORMS), choices=NORMS,
                   help="norms of the evaluation")
    add_attack_options(p)
    p.add_argument("--batch-size", dest="eval_batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="test samples per attack batch of the evaluation, as in `eval`")
    # The name before --batch-size meant the same in compare and eval; kept for old scripts.
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=int,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_compare(args) -> int:
    check_output_folder(args.output, "-o/--output")
    if args.batch_size is not None and args.batch_size < 1:  # named here as compare calls it
        raise UserInputError(f"--train-batch-size must be >= 1, got {args.batch_size}")
    # Without --noise every run takes the paper's levels of the dataset (EvalOptions.noise_levels).
    evaluations = [eval_options(args, norm, args.eval_batch_size) for norm in args.eval_norms]
    eps = args.eps if args.eps is not None else PAPER_SETTINGS[args.dataset].eps_max
    runs = []
    # Every method's settings are checked before the first one trains: a bad option found
    # after an hour of training would waste it.
    for method in dict.fromkeys(args.methods):
        folder = os.path.join(args.output, run_name(method, eps))
        method_args = argparse.Namespace(**{**vars(args), "method": method,
                                            "eps": eps if method == "adv" else args.eps})
        runs.append((folder, config_from_args(method_args)))
    tables = compare(args.output, runs, evaluations, execution_from_args(args), args.save_every)
    print("\n".join(tables))
    return 0


# ----------------------------------------------------------------------------------- main
# command -> (its line in the list of commands, its description or None, what adds its
# options, what runs it)
COMMANDS = {
    "train": ("train a classifier (ce, adv, ima or a baseline)",
              "Train with clean cross-entropy (ce), vanilla PGD adversarial training (adv), IMA, "
              "or the baselines trades, mma, ddn, fat, gairat. Defaults are the paper's settings "
              "of the dataset.", add_train_options, run_train),
    "eval": ("robust accuracy under 100-PGD (cross-entropy and margin loss), optionally APGD and "
             "SPSA",
             "The paper's evaluation: per noise level, 100-step PGD (step noise/10, random "
             "start) maximising the cross-entropy and, separately, the margin loss; optionally "
             "also AutoAttack's APGD-CE / APGD-DLR (torchattacks) and the gradient-free SPSA. A "
             "test sample is robust only if it is classified correctly and every attack fails. "
             "A warning flags noise levels where PGD is more than 2 points above a stronger "
             "attack (gradient masking).", add_eval_options, run_eval),
    "margins": ("the margin distribution of an IMA run and the eps it suggests", None,
                add_margins_options, run_margins),
    "compare": ("train several methods on one dataset and tabulate their robustness (the "
                "paper's comparison)",
                "Train every --methods with the same settings (the paper's for the dataset "
                "unless given), evaluate each under the --attacks at every noise level of every "
                "--eval-norms, and write DIR/table_<norm>.md and DIR/curves_<norm>.png. adv and "
                "the baselines train at --eps, default the dataset's eps_max. A rerun resumes: "
                "finished trainings are kept and an evaluation is redone only when its settings "
                "changed or the model is newer than it.", add_compare_options, run_compare),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-ima-classify",
                                     formatter_class=DefaultsHelpFormatter,
                                     description="IMA, vanilla adversarial and clean training and "
                                                 "robustness evaluation for image classification")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, description, add_options, _) in COMMANDS.items():
        add_options(sub.add_parser(name, help=help_text, description=description,
                                   formatter_class=DefaultsHelpFormatter))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input: one message, exit code 2; Ctrl-C: exit code 130 (`train` and `compare`
    resume from their checkpoints when the same command is run again)."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run_command(f"nnunet-ima-classify {args.command}",
                           lambda: COMMANDS[args.command][3](args))
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (or a test)


if __name__ == "__main__":
    sys.exit(main())
