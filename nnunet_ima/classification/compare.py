"""``nnunet-ima-classify compare``: train several methods on one dataset with the same settings,
attack each, and write one robustness table per norm (rows = methods, columns = noise levels, as
the paper's tables) and robustness curves.

    nnunet-ima-classify compare --dataset moons -o runs/moons_compare
    nnunet-ima-classify compare --dataset moons --methods ce adv ima trades --eval-norms l2 -o DIR
    nnunet-ima-classify compare --dataset moons --train-batch-size 64 --batch-size 1000 -o DIR

``--batch-size`` is the evaluation's batch size, as in `eval` (and in nnunet-ima-eval); the
training batch size is ``--train-batch-size``.

Layout of ``-o DIR``: one run folder per method (``DIR/ce``, ``DIR/adv0.3``, ``DIR/ima``, ...,
each exactly what `train` writes, with its ``eval_<norm>.json``), ``DIR/table_<norm>.md`` and
``DIR/curves_<norm>.png``. A rerun resumes: finished trainings are kept (an unfinished one
continues from its checkpoint) and an evaluation is redone only when its settings changed or the
model is newer than it.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Sequence, Tuple

import torch

from nnunet_ima.classification import cli
from nnunet_ima.classification.datasets import DATASETS
from nnunet_ima.classification.files import write_text
from nnunet_ima.classification.settings import METHODS, PAPER_SETTINGS, TrainConfig
from nnunet_ima.classification.strong_attacks import settings_record
from nnunet_ima.classification.training import FINAL
from nnunet_ima.errors import UserInputError
from nnunet_ima.help_format import DefaultsHelpFormatter
from nnunet_ima.io import check_output_folder

NORMS = ("l2", "linf")


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="train several methods on one dataset and tabulate their "
                                       "robustness (the paper's comparison)",
                       formatter_class=DefaultsHelpFormatter,
                       description="Train every --methods with the same settings (the paper's "
                                   "for the dataset unless given), evaluate each under the "
                                   "--attacks at every noise level of every --eval-norms, and "
                                   "write DIR/table_<norm>.md and DIR/curves_<norm>.png. adv and "
                                   "the baselines train at --eps, default the dataset's eps_max.")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="the dataset to train on")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to train and compare (default: all, %(default)s)")
    p.add_argument("-o", "--output", required=True,
                   help="comparison folder: one run folder per method, tables and curves")
    cli.add_training_options(p, batch_option="--train-batch-size")
    p.add_argument("--eval-norms", nargs="+", default=list(NORMS), choices=NORMS,
                   help="norms of the evaluation")
    cli.add_attack_options(p)
    p.add_argument("--batch-size", dest="eval_batch_size", type=int, default=500,
                   help="test samples per attack batch of the evaluation, as in `eval`")
    # The name before --batch-size meant the same in compare and eval; kept for old scripts.
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=int,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_name(method: str, eps: float) -> str:
    """The folder and table row of a method: ``adv`` carries its budget, as in the paper."""
    return f"adv{eps:g}" if method == "adv" else method


def _train_args(args, method: str, eps: float, folder: str) -> argparse.Namespace:
    """`train`'s options for one method: the comparison's options, this method and folder."""
    values = dict(vars(args), method=method, output=folder, resume=None,
                  eps=eps if method == "adv" else args.eps)
    return argparse.Namespace(**values)


def _eval_args(args, norm: str) -> argparse.Namespace:
    """`eval`'s options for one norm; the attacks' seed is the comparison's ``--seed``."""
    return argparse.Namespace(**dict(vars(args), norm=norm, batch_size=args.eval_batch_size,
                                     output=None))


def _report_is_current(folder: str, eval_args: argparse.Namespace, n_expected_noise: List[str]) -> bool:
    """Whether ``folder/eval_<norm>.json`` already holds this evaluation of the current model."""
    path = os.path.join(folder, f"eval_{eval_args.norm}.json")
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(os.path.join(folder, FINAL)):
        return False
    try:
        with open(path) as f:
            report = json.load(f)
    except ValueError:
        return False
    # Every option a result depends on: each batch draws its own seeded starts, so the batch
    # size counts too; APGD restarts and SPSA settings are in the attacks' settings record.
    expected_settings = json.loads(json.dumps(settings_record(
        eval_args.attacks, eval_args.steps, cli.attack_settings(eval_args))))
    return (report.get("attacks") == list(eval_args.attacks) and report.get("steps") == eval_args.steps
            and report.get("seed") == eval_args.seed and sorted(report.get("noise", {})) == n_expected_noise
            and report.get("max_samples") == eval_args.max_samples
            and report.get("batch_size") == eval_args.batch_size
            and report.get("attack_settings") == expected_settings)


def _load_report(folder: str, norm: str) -> dict:
    with open(os.path.join(folder, f"eval_{norm}.json")) as f:
        return json.load(f)


def run_compare(args) -> int:
    check_output_folder(args.output, "-o/--output")
    if args.batch_size is not None and args.batch_size < 1:  # named here as compare calls it
        raise UserInputError(f"--train-batch-size must be >= 1, got {args.batch_size}")
    cli._check_eval_args(_eval_args(args, args.eval_norms[0]))  # --batch-size among them
    eps = args.eps if args.eps is not None else PAPER_SETTINGS[args.dataset].eps_max
    methods = list(dict.fromkeys(args.methods))
    folders = [os.path.join(args.output, run_name(m, eps)) for m in methods]
    # Every method's settings are checked before the first one trains: a bad option found
    # after an hour of training would waste it.
    configs = [cli.config_from_args(_train_args(args, m, eps, f)) for m, f in zip(methods, folders)]
    os.makedirs(args.output, exist_ok=True)
    for method, folder, config in zip(methods, folders, configs):
        if _trained(folder, config):
            print(f"compare: {folder} is trained, kept", flush=True)
            continue
        print(f"compare: training {method} -> {folder}", flush=True)
        cli.run_train(_train_args(args, method, eps, folder))
    noise = sorted(set(args.noise if args.noise is not None else PAPER_SETTINGS[args.dataset].noise))
    noise_keys = sorted(f"{n:g}" for n in noise)
    tables = []
    for norm in args.eval_norms:
        eval_args = _eval_args(args, norm)
        eval_args.noise = noise
        stale = [f for f in folders if not _report_is_current(f, eval_args, noise_keys)]
        if stale:
            cli.evaluate_runs(stale, eval_args)
        rows = [(os.path.basename(f), _load_report(f, norm)) for f in folders]
        table = cli.markdown_table(rows, norm, args.steps, args.attacks)
        write_text(os.path.join(args.output, f"table_{norm}.md"), table)
        plot_robustness_curves(rows, norm, os.path.join(args.output, f"curves_{norm}.png"),
                               f"{args.dataset}: robust accuracy under {norm.upper()} attacks")
        tables.append(table)
    print("\n".join(tables))
    return 0


def _trained(folder: str, config: TrainConfig) -> bool:
    """Whether ``folder`` holds the final model of ``config``; the final model of other settings
    is a :class:`UserInputError` (a comparison never mixes settings)."""
    path = os.path.join(folder, FINAL)
    if not os.path.isfile(path):
        return False
    differences = cli.load_run(folder, torch.device("cpu"))[0].differences(config)
    if differences:
        raise UserInputError(f"{folder} holds a model trained with other settings "
                             f"({'; '.join(differences)}; saved != asked); use another -o, repeat "
                             f"the saved settings, or delete the folder")
    return True


def plot_robustness_curves(rows: Sequence[Tuple[str, dict]], norm: str, path: str, title: str) -> None:
    """Robust accuracy (%) against noise level, one line per run (the paper's Figures 5-7 style)."""
    from nnunet_ima.plotting import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lowest = 100.0
    for name, report in rows:
        levels = sorted(report["noise"], key=float)
        ax.plot([float(n) for n in levels], [100 * report["noise"][n] for n in levels],
                marker="o", label=f"{name} (AUC {100 * report['auc']:.1f})"
                if report.get("auc") is not None else name)
        lowest = min([lowest] + [100 * report["noise"][n] for n in levels])
    ax.set_xlabel(f"{norm.upper()} noise level")
    ax.set_ylabel("robust accuracy (%)")
    # From the 10 % step below the lowest value: robust methods differ by a few points, which a
    # 0-100 axis would flatten.
    ax.set_ylim(10 * int(max(lowest - 1, 0) // 10), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
