"""``nnunet-ima demo``: the whole product on a small built-in dataset, on a CPU, in minutes.

It runs the same commands a user runs on a real dataset, printing each one:

1. ``nnunet-ima make-synthetic`` (a synthetic nnU-Net raw dataset: an organ and a lesion in
   small 3D volumes; ``--dataset-folder`` takes any nnU-Net raw dataset instead),
2. ``nnUNetv2_plan_and_preprocess -c 2d``,
3. ``nnunet-ima split`` (held-out test cases),
4. ``nnUNetv2_train ... -tr nnUNetTrainerClean / nnUNetTrainerAdv / nnUNetTrainerIMA`` with a
   short schedule written to an ``NNUNET_IMA_CONFIG`` file,
5. ``nnunet-ima-eval`` on the three models, which prints the TVDI and ADI tables.

Everything lives under ``--workdir`` (its own ``nnUNet_raw/preprocessed/results``); a finished
step is skipped when the demo is run again.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List

from nnunet_ima.commands.trainer_dir import trainer_dir
from nnunet_ima.errors import UserInputError

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID}_SyntheticOrgan"
TRAINERS = ("nnUNetTrainerClean", "nnUNetTrainerAdv", "nnUNetTrainerIMA")


def demo_settings(epochs: int, iterations: int) -> Dict[str, dict]:
    """The short training schedule of each trainer (the paper's settings, scaled down).

    Budgets are L2 norms over a 48 x 48 z-scored slice: eps 8 is a per-pixel RMS of 8 / 48 =
    0.17 standard deviations, eps 16 of 0.33. They are the ablation's on this data (README,
    "Which IMA"): Adv at the middle budget 8, IMA with eps_max 16 and its default (authors')
    recipe; at noise 16 the undefended model loses about half of its Dice.
    """
    # One seed for all three: the same initial network and the same first batches. Twice
    # nnU-Net's learning rate: with 0.01, 100 iterations often end before the small lesion
    # class is found at all.
    schedule = {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
                "num_val_iterations_per_epoch": 2, "seed": 0, "initial_lr": 0.02}
    attack = {"pgd_steps": 5, "pgd_alpha": 4.0}
    return {
        "nnUNetTrainerClean": dict(schedule),
        "nnUNetTrainerAdv": dict(schedule, **attack, adv_eps=8.0),
        "nnUNetTrainerIMA": dict(schedule, **attack, eps_max=16.0, binary_steps=5),
    }


def _bin(name: str) -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


class DemoRunner:
    """Runs the demo's commands in ``workdir`` with nnU-Net's environment set."""

    def __init__(self, workdir: str, quiet: bool):
        self.workdir = os.path.abspath(workdir)
        self.quiet = quiet
        self.folders = {name: os.path.join(self.workdir, name)
                        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        for folder in self.folders.values():
            os.makedirs(folder, exist_ok=True)
        self.env = dict(os.environ, **self.folders, nnUNet_def_n_proc="1",
                        nnUNet_extTrainer=trainer_dir())
        self.env.pop("NNUNET_IMA_CONFIG", None)
        self.env.pop("nnUNet_n_proc_DA", None)  # planning fails with it in nnunetv2 2.8.1

    def run(self, args: List[str], extra_env: Dict[str, str] = None, log_name: str = None) -> None:
        env = dict(self.env, **(extra_env or {}))
        shown = " ".join(f"{k}={v}" for k, v in (extra_env or {}).items())
        print(f"\n$ {shown + ' ' if shown else ''}{' '.join(shlex.quote(a) for a in args)}",
              flush=True)
        start = time.time()
        log_path = os.path.join(self.workdir, "logs", (log_name or os.path.basename(args[0])) + ".log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            if self.quiet:
                result = subprocess.run(args, env=env, stdout=log, stderr=subprocess.STDOUT)
            else:
                result = subprocess.run(args, env=env)
        if result.returncode != 0:
            raise UserInputError(f"{' '.join(args[:2])} failed (exit {result.returncode}); see "
                                 f"{log_path if self.quiet else 'the output above'}")
        print(f"  done in {time.time() - start:.0f} s" + (f" (log: {log_path})" if self.quiet else ""),
              flush=True)

    def fold_done(self, trainer: str) -> bool:
        return os.path.isfile(os.path.join(self.folders["nnUNet_results"], DATASET_NAME,
                                           f"{trainer}__nnUNetPlans__2d", "fold_0",
                                           "checkpoint_final.pth"))


def run_evaluation(folders: Dict[str, str], eval_args: List[str]) -> int:
    """Show and run ``nnunet-ima-eval eval_args`` in this process with the ``nnUNet_*`` folders
    ``folders`` set; the environment is restored afterwards. Returns the exit code."""
    from nnunet_ima.evaluation.cli import main as evaluate
    print(f"\n$ nnunet-ima-eval {' '.join(eval_args)}", flush=True)
    saved = {k: os.environ.get(k) for k in folders}
    os.environ.update(folders)
    try:
        return evaluate(eval_args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="nnunet_ima_demo",
                        help="folder for the demo's nnU-Net folders and results "
                             "(default ./nnunet_ima_demo)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--iterations", type=int, default=10,
                        help="training iterations per epoch (default 10)")
    parser.add_argument("--cases", type=int, default=10, help="synthetic cases (default 10)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 4.0, 8.0, 16.0],
                        help="L2 noise levels of the evaluation (default 0 4 8 16)")
    parser.add_argument("--eval-steps", type=int, default=100,
                        help="PGD steps of the evaluation (default 100, as in the paper)")
    parser.add_argument("--max-slices", type=int, default=12,
                        help="test slices evaluated per model (default 12)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the output of nnU-Net's commands instead of writing logs")
    parser.add_argument("--fresh", action="store_true", help="delete WORKDIR first")


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.iterations < 1 or args.cases < 4:
        raise UserInputError("--epochs and --iterations must be >= 1 and --cases >= 4")
    if any(n < 0 for n in args.noise):
        raise UserInputError(f"noise levels must be >= 0, got {args.noise}")
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    start = time.time()
    runner = DemoRunner(args.workdir, quiet=not args.verbose)
    print(f"nnunet-ima demo in {runner.workdir}")

    raw_dataset = os.path.join(runner.folders["nnUNet_raw"], DATASET_NAME)
    if not os.path.isdir(raw_dataset):
        runner.run([_bin("nnunet-ima"), "make-synthetic", "-d", str(DATASET_ID),
                    "--cases", str(args.cases)], log_name="make-synthetic")
    preprocessed = os.path.join(runner.folders["nnUNet_preprocessed"], DATASET_NAME)
    if not os.path.isdir(os.path.join(preprocessed, "nnUNetPlans_2d")):
        runner.run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d",
                    "-npfp", "1", "-np", "1", "--verify_dataset_integrity"])
    runner.run([_bin("nnunet-ima"), "split", "-d", str(DATASET_ID), "--test", "2", "--seed", "0"],
               log_name="split")

    settings = demo_settings(args.epochs, args.iterations)
    for trainer in TRAINERS:
        if runner.fold_done(trainer):
            print(f"\n{trainer}: already trained, skipped")
            continue
        config_path = os.path.join(runner.workdir, f"{trainer}.json")
        with open(config_path, "w") as f:
            json.dump(settings[trainer], f, indent=2)
        runner.run([_bin("nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", trainer,
                    "-device", "cpu"],
                   extra_env={"NNUNET_IMA_CONFIG": config_path, "nnUNet_n_proc_DA": "0"},
                   log_name=f"train_{trainer}")

    out = os.path.join(runner.workdir, "robustness")
    eval_args = ["-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", *TRAINERS,
                 "--noise", *[f"{n:g}" for n in args.noise], "--steps", str(args.eval_steps),
                 "--max-slices", str(args.max_slices), "--device", "cpu", "-o", out]
    code = run_evaluation(runner.folders, eval_args)
    if code:
        return code
    print(f"\nDemo finished in {(time.time() - start) / 60:.1f} min. Results: {out}/ "
          f"(summary.json, tvdi.md, adi.md, curves.png, examples.png)")
    return 0
