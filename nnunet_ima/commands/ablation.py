"""``nnunet-ima ablation``: Clean, Adv budgets, IMA recipes and their one-factor variants on one
dataset, with the baselines and controls asked for (TRADES, N-FGSM, Adv at eps_max, fine-tunings
of the clean model), side by side, attacked and tabulated (see :mod:`nnunet_ima.nnunet.ablation`).

Its options are generated from the declarations of
:class:`~nnunet_ima.nnunet.ablation.AblationOptions` (type, default, help)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from nnunet_ima.declared import add_option
from nnunet_ima.nnunet.ablation import AblationOptions, run_ablation

# nnU-Net's spellings beside the declared ones (``-f`` as nnUNetv2_train's fold).
_SPELLINGS = {"dataset": ("-d", "--dataset"), "fold": ("-f", "--fold"),
              "device": ("-device", "--device")}
_REQUIRED = ("dataset", "workdir")


def configure(parser: argparse.ArgumentParser) -> None:
    for f in fields(AblationOptions):
        add_option(parser, AblationOptions, f.name, *_SPELLINGS.get(f.name, ()),
                   **({"required": True} if f.name in _REQUIRED else {}))
    parser.add_argument("--stop-after", choices=("train", "report"), default="report",
                        help="train only, or train, evaluate and report")
    parser.epilog = (
        "ablation.md holds, per case set, the means over the seeds and then their intervals: "
        "clean TVDI and TVDI AUC with a 95 % bootstrap interval over the evaluated cases and "
        "their slices (cases drawn with replacement, then slices within each drawn case; "
        "--bootstrap draws), with several --seeds also a 95 % t interval over the seeds, and "
        "each model's paired difference against the Adv model with the best TVDI AUC (the same "
        "seeds, slices and draws), marked * where its intervals exclude 0, and the clean, Adv, "
        "baseline and fine-tuned models that dominate it within the intervals (at least as good "
        "on both means, with a paired difference above 0 on one); nnunet-ima ablation-summary "
        "puts the reports of several datasets side by side. The bootstrap says "
        "how far another sample of cases like these could move a number, not how it would "
        "change on other data: with a few cases, or one subject cut into cases, the intervals "
        "are wide or say little about new subjects (docs/benchmarks.md). The ft_* variants "
        "fine-tune the clean model of their seed and train after every other model; the "
        "table's s/epoch compares only models trained one at a time (--jobs 1).")


def run(args: argparse.Namespace) -> int:
    options = AblationOptions(**{f.name: getattr(args, f.name) for f in fields(AblationOptions)})
    text = run_ablation(options, stop_after=args.stop_after)
    if text:
        print("\n" + text)
    return 0
