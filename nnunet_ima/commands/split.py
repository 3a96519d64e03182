"""``nnunet-ima split``: held-out test cases and nnU-Net's cross-validation folds without them.

Writes into ``$nnUNet_preprocessed/DatasetXXX_Name/``:

- ``test_cases.json``: a seeded draw of ``--test`` cases, the ones ``nnunet-ima-eval`` attacks;
- ``splits_final.json``: ``--folds`` folds of nnU-Net's own cross-validation split
  (``generate_crossval_split``: scikit-learn's shuffled ``KFold`` seeded with ``--seed``) over the
  remaining cases, so that ``nnUNetv2_train DATASET 2d K`` never sees a test case for any
  ``K < --folds``. The default is nnU-Net's 5, or one fold per remaining case when fewer remain
  (every fold needs a validation case).

Every fold has to be written: for a fold missing from ``splits_final.json``, nnU-Net draws its own
80:20 split over all cases, test cases included (this package's trainers refuse such a fold).
Fold ``all`` ignores the split altogether: nnU-Net trains it on every preprocessed case, so it has
no held-out cases (this package's trainers refuse it beside test cases, and ``nnunet-ima-eval``
refuses to score its training cases).

Rewriting a split under trained models (``--overwrite``) changes what their fold means: the
command names the fold folders under ``$nnUNet_results/<dataset>`` whose cases would change and
refuses unless ``--force`` is given too. The paper's Heart protocol (16 train / 1 validation / 3 test) is close
to ``nnunet-ima split -d 2 --test 3`` (fold 0: 13 train / 4 validation).

This module parses the options; the split is made and written by
:mod:`nnunet_ima.nnunet.split_plan`.
"""
from __future__ import annotations

import argparse

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.split_plan import DEFAULT_FOLDS, DEFAULT_SEED, write_split

FOLD_ALL_NOTE = ("note: `nnUNetv2_train ... all` ignores splits_final.json and trains on every "
                 "preprocessed case, these test cases included: this package's trainers refuse "
                 "it (unless NNUNET_IMA_ALLOW_FOLD_ALL=1), and nnunet-ima-eval refuses to score a "
                 "fold-all model on them. Train folds 0-{last} for held-out results.")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("--test", type=int, required=True, help="number of held-out test cases")
    parser.add_argument("--folds", type=int,
                        help=f"cross-validation folds over the other cases (default "
                             f"{DEFAULT_FOLDS} as nnU-Net, or one per case when fewer remain)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the test draw and of the folds (default {DEFAULT_SEED}, "
                             f"nnU-Net's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, different split")
    parser.add_argument("--force", action="store_true",
                        help="with --overwrite: replace it even where trained models (fold "
                             "folders under $nnUNet_results) have folds whose cases it changes")


def run(args: argparse.Namespace) -> int:
    if args.force and not args.overwrite:
        raise UserInputError("--force only goes with --overwrite (it lets --overwrite replace the "
                             "split of trained models)")
    split = write_split(args.dataset, args.test, args.seed, args.folds, args.overwrite,
                        args.force)
    print(f"test  {len(split['test'])}: {' '.join(split['test'])}")
    for k, fold in enumerate(split["folds"]):
        print(f"fold {k}: train {len(fold['train'])}, val {len(fold['val'])}: "
              f"{' '.join(fold['val'])}")
    if split["test"]:
        print(FOLD_ALL_NOTE.format(last=len(split["folds"]) - 1))
    return 0
