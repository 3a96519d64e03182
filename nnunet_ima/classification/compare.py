"""Compare training methods on one dataset: train each (same settings), attack each, and write
one robustness table per norm (rows = methods, columns = noise levels, as the paper's tables)
and robustness curves. ``nnunet-ima-classify compare`` is its command line.

Layout of the output folder: one run folder per method (``DIR/ce``, ``DIR/adv0.3``,
``DIR/ima``, ..., each exactly what `train` writes, with its ``eval_<norm>.json``),
``DIR/table_<norm>.md`` and ``DIR/curves_<norm>.png``. A rerun resumes: finished trainings are
kept (an unfinished one continues from its checkpoint) and an evaluation is redone only when its
settings changed or the model is newer than it.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch

from nnunet_ima.classification.evaluate import (EvalOptions, evaluate_runs, load_report,
                                                report_is_current)
from nnunet_ima.classification.runs import ExecutionOptions, load_run, train_run
from nnunet_ima.classification.settings import TrainConfig
from nnunet_ima.classification.tables import markdown_table, plot_robustness_curves
from nnunet_ima.classification.training import FINAL
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_text


def run_name(method: str, eps: float) -> str:
    """The folder and table row of a method: ``adv`` carries its budget, as in the paper."""
    return f"adv{eps:g}" if method == "adv" else method


def compare(output: str, runs: Sequence[Tuple[str, TrainConfig]],
            evaluations: Sequence[EvalOptions], execution: ExecutionOptions,
            save_every: int = 0) -> List[str]:
    """Train every ``(folder, config)`` of ``runs`` not trained yet, evaluate each model under
    every ``evaluations`` entry (one per norm) where its report is not current, and write the
    tables and curves into ``output``; returns the markdown tables.

    Raises:
        UserInputError: a folder holds a final model of other settings (a comparison never mixes
            settings).
    """
    # Every folder is checked before the first one trains: a mismatch found after an hour of
    # training would waste it.
    trained = [_trained(folder, config) for folder, config in runs]
    os.makedirs(output, exist_ok=True)
    for (folder, config), done in zip(runs, trained):
        if done:
            print(f"compare: {folder} is trained, kept", flush=True)
            continue
        print(f"compare: training {config.method} -> {folder}", flush=True)
        last = train_run(config, folder, execution, save_every=save_every)
        print(f"final: train_acc {last['train_acc']:.4f} val_acc {last['val_acc']:.4f} -> "
              f"{os.path.join(folder, FINAL)}")
    dataset = runs[0][1].dataset
    folders = [folder for folder, _ in runs]
    tables = []
    for options in evaluations:
        stale = [f for f, c in runs
                 if not report_is_current(f, options, c.dataset, os.path.join(f, FINAL))]
        if stale:
            evaluate_runs(stale, options, execution)
        rows = [(os.path.basename(f), load_report(f, options.norm)) for f in folders]
        table = markdown_table(rows, options.norm, options.steps, options.attacks)
        write_text(os.path.join(output, f"table_{options.norm}.md"), table)
        plot_robustness_curves(rows, options.norm,
                               os.path.join(output, f"curves_{options.norm}.png"),
                               f"{dataset}: robust accuracy under {options.norm.upper()} attacks")
        tables.append(table)
    return tables


def _trained(folder: str, config: TrainConfig) -> bool:
    """Whether ``folder`` holds the final model of ``config``; the final model of other settings
    is a :class:`UserInputError`."""
    path = os.path.join(folder, FINAL)
    if not os.path.isfile(path):
        return False
    differences = load_run(folder, torch.device("cpu"))[0].differences(config)
    if differences:
        raise UserInputError(f"{folder} holds a model trained with other settings "
                             f"({'; '.join(differences)}; saved != asked); use another -o, repeat "
                             f"the saved settings, or delete the folder")
    return True
