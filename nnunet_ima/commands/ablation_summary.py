"""``nnunet-ima ablation-summary WORKDIR [WORKDIR ...]``: the reports of several ablations (one
per dataset) side by side, and the IMA reading that no other model dominates on the most
datasets (see :mod:`nnunet_ima.nnunet.ablation_summary`).

Its options are generated from the declarations of
:class:`~nnunet_ima.nnunet.ablation_summary.SummaryOptions` (type, default, help)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from nnunet_ima.declared import add_option, option_arguments
from nnunet_ima.nnunet.ablation_summary import SummaryOptions, run_summary


def configure(parser: argparse.ArgumentParser) -> None:
    # The workdirs are positional; argparse takes no dest= for a positional, so its name is it.
    declared = option_arguments(SummaryOptions, "workdirs")
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", type=declared["type"],
                        help=declared["help"])
    for name in ("cases", "candidates", "output"):
        add_option(parser, SummaryOptions, name,
                   **({"metavar": "NAME"} if name == "candidates" else
                      {"metavar": "FILE.md"} if name == "output" else {}))
    parser.epilog = (
        "Reads each workdir's ablation.json, written by nnunet-ima ablation's report; a report "
        "written before it named the dominating models is refused with the ablation command to "
        "run again (it trains nothing that is done and only rewrites the report). A model is "
        "dominated within the intervals by a clean, Adv, baseline or fine-tuned model at least "
        "as good on the means of clean TVDI and TVDI AUC and with a paired difference above 0 "
        "on one of them. The default by the evidence is the IMA reading undominated on the "
        "most datasets; ties go to the best mean rank of TVDI AUC among the tied readings over "
        "the datasets holding them all, then of clean TVDI, then the name.")


def run(args: argparse.Namespace) -> int:
    options = SummaryOptions(**{f.name: getattr(args, f.name) for f in fields(SummaryOptions)})
    print(run_summary(options))
    return 0
