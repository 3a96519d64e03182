"""``nnunet-ima ablation``: Clean, Adv budgets, IMA recipes and their one-factor variants on one
dataset, side by side, attacked and tabulated (see :mod:`nnunet_ima.nnunet.ablation`)."""
from __future__ import annotations

import argparse

from nnunet_ima.nnunet.ablation import DEFAULT_VARIANTS, FACTORS, AblationOptions, run_ablation

_DEFAULTS = AblationOptions(dataset="", workdir="")


def configure(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument("-d", "--dataset", required=True,
                        help="dataset id or name, planned (2d) and split with nnunet-ima split")
    parser.add_argument("--workdir", required=True,
                        help="folder for the models (one nnUNet_results per variant), the "
                             "evaluations, ablation.md / ablation.json / ablation.png")
    parser.add_argument("--variants", nargs="+", default=list(d.variants),
                        help=f"models to train (default: {' '.join(DEFAULT_VARIANTS)}); 'adv' is "
                             f"one model per --adv-eps; authors-<factor> / printed+<factor> with "
                             f"factor in {', '.join(FACTORS)}")
    parser.add_argument("--adv-eps", type=float, nargs="+", default=list(d.adv_eps),
                        help="budgets of the Adv models (default %(default)s)")
    parser.add_argument("--eps-max", type=float, default=d.eps_max,
                        help="eps_max of every IMA model (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    parser.add_argument("--iterations", type=int, default=d.iterations,
                        help="training iterations per epoch (default %(default)s)")
    parser.add_argument("--val-iterations", type=int, default=d.val_iterations,
                        help="default %(default)s")
    parser.add_argument("--initial-lr", type=float, default=d.initial_lr,
                        help="learning rate of every model but clean_half_lr (default %(default)s)")
    parser.add_argument("--pgd-steps", type=int, default=d.pgd_steps,
                        help="PGD steps of the Adv and IMA trainings (default %(default)s)")
    parser.add_argument("--binary-steps", type=int, default=d.binary_steps,
                        help="IMA's bisection steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="training and evaluation seed, the same for every model "
                             "(default %(default)s)")
    parser.add_argument("-f", "--fold", type=int, default=d.fold, help="default %(default)s")
    parser.add_argument("--jobs", type=int, default=d.jobs,
                        help="trainings side by side (default %(default)s); the CPU cores are "
                             "shared between them")
    parser.add_argument("-device", "--device", default=d.device, help="default %(default)s")
    parser.add_argument("--noise", type=float, nargs="+", default=list(d.noise),
                        help="evaluation noise levels, L2 in z-score units (default %(default)s)")
    parser.add_argument("--eval-steps", type=int, default=d.eval_steps,
                        help="steps of every evaluation attack (default %(default)s)")
    parser.add_argument("--attacks", nargs="+", default=list(d.attacks),
                        help="nnunet-ima-eval attacks; the table takes the worst per noise "
                             "level (default %(default)s)")
    parser.add_argument("--cases", nargs="+", default=list(d.cases),
                        help="case sets to evaluate, one table each: test, val "
                             "(default %(default)s)")
    parser.add_argument("--max-slices", type=int, default=d.max_slices,
                        help="slices evaluated per model and case set (default %(default)s)")
    parser.add_argument("--stop-after", choices=("train", "report"), default="report",
                        help="train only, or train, evaluate and report (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    options = AblationOptions(
        dataset=args.dataset, workdir=args.workdir, variants=args.variants,
        adv_eps=args.adv_eps, eps_max=args.eps_max, epochs=args.epochs,
        iterations=args.iterations, val_iterations=args.val_iterations,
        initial_lr=args.initial_lr, pgd_steps=args.pgd_steps, binary_steps=args.binary_steps,
        seed=args.seed, fold=args.fold, jobs=args.jobs, device=args.device, noise=args.noise,
        eval_steps=args.eval_steps, attacks=args.attacks, cases=args.cases,
        max_slices=args.max_slices)
    text = run_ablation(options, stop_after=args.stop_after)
    if text:
        print("\n" + text)
    return 0
