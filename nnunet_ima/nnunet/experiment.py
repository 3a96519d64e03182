"""An nnU-Net experiment in one folder: plan and preprocess a dataset, train the Clean, Adv and
IMA trainers, evaluate the three models.

``nnunet-ima demo`` (a synthetic dataset), ``benchmarks/pyradiomics_benchmark.py`` (real CT /
MR lesions) and ``benchmarks/colin27_benchmark.py`` (the Colin27 brain with its AAL atlas) are
such experiments. An :class:`Experiment` gives its workdir its own
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``, runs the same commands a user
types, each shown and logged to ``WORKDIR/logs``, and skips a training whose final checkpoint
exists.

Same seed, same models: on a CPU a seeded training gives the same weights bit for bit every time
on one machine (augmentation in the training process, see
:func:`~nnunet_ima.nnunet.pipeline.data_augmentation_workers`; the blur without timing, see
:func:`~nnunet_ima.nnunet.data.without_timed_choices`), alone or side by side with others.
Another machine may give other weights: torch uses all its cores, and float sums depend on the
number of threads and on the CPU's instruction set. On a GPU a seeded training is not repeatable.

The benchmark scripts on real data share the rest of their run here: their command line
(:func:`add_benchmark_arguments`), the options recorded in the raw dataset
(:func:`check_recorded_options`), the raw dataset's files (:func:`write_raw_case`,
:func:`write_dataset_json`), their fixed splits (:func:`save_case_split`) and the steps from
planning to evaluation (:func:`run_benchmark`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_json
from nnunet_ima.nnunet.paths import trainer_dir
from nnunet_ima.nnunet.pipeline import (Command, console_script, data_augmentation_workers,
                                        run_commands)

if TYPE_CHECKING:  # the evaluator imports torch; the experiment's commands need none of it
    import SimpleITK as sitk

    from nnunet_ima.evaluation.options import EvalOptions

TRAINERS = ("nnUNetTrainerClean", "nnUNetTrainerAdv", "nnUNetTrainerIMA")
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def final_checkpoint(model_folder: str, fold) -> str:
    """Where ``nnUNetv2_train`` leaves the final checkpoint of ``fold`` in ``model_folder``
    (``.../Trainer__Plans__2d``): the mark of a finished training."""
    return os.path.join(model_folder, f"fold_{fold}", "checkpoint_final.pth")


def training_command(dataset: str, fold, trainer: str, settings: dict, config: str,
                     device: str, jobs: int, log_name: str, resume: bool = False,
                     env: Optional[Mapping[str, str]] = None) -> Command:
    """``nnUNetv2_train DATASET 2d FOLD -tr TRAINER -device DEVICE`` (``--c`` with ``resume``:
    continue an unfinished training), with ``settings`` written to ``config`` and given as
    ``NNUNET_IMA_CONFIG``. ``jobs`` (trainings at once) sets its data-augmentation workers
    (:func:`~nnunet_ima.nnunet.pipeline.data_augmentation_workers`: none on a CPU, which keeps
    a seeded training repeatable); ``env`` adds to its environment."""
    write_json(config, settings)
    return Command([console_script("nnUNetv2_train"), str(dataset), "2d", str(fold), "-tr",
                    trainer, "-device", device, *(["--c"] if resume else [])], log_name,
                   {**(env or {}), "NNUNET_IMA_CONFIG": config,
                    "nnUNet_n_proc_DA": data_augmentation_workers(device, jobs)})


class CommandFailed(UserInputError):
    """A command of the experiment failed; the message names it and where its output is."""


class Experiment:
    """Runs an experiment's commands in ``workdir`` with nnU-Net's environment set.

    ``show_output``: commands write to this process's output instead of ``WORKDIR/logs``.
    """

    def __init__(self, workdir: str, show_output: bool = False):
        self.workdir = os.path.abspath(workdir)
        self.show_output = show_output
        self.log_folder = os.path.join(self.workdir, "logs")
        self.folders = {name: os.path.join(self.workdir, name) for name in NNUNET_FOLDERS}
        for folder in self.folders.values():
            os.makedirs(folder, exist_ok=True)
        self.env = dict(os.environ, **self.folders, nnUNet_def_n_proc="1",
                        nnUNet_extTrainer=trainer_dir())
        self.env.pop("NNUNET_IMA_CONFIG", None)
        self.env.pop("nnUNet_n_proc_DA", None)  # planning fails with it in nnunetv2 2.8.1

    # ------------------------------------------------------------------------------ commands
    def _shows_output(self, show_output: Optional[bool]) -> bool:
        return self.show_output if show_output is None else show_output

    def run(self, command: Command, show_output: Optional[bool] = None) -> None:
        """Run one command and wait for it; one line says how long it took (and where its log
        is).

        Raises:
            CommandFailed: it exited non-zero.
        """
        shown = self._shows_output(show_output)
        (finished,) = run_commands([command], self.log_folder, self.env, show_output=shown)
        log = None if shown else finished.log_path
        if finished.returncode != 0:
            raise CommandFailed(f"{' '.join(command.args[:2])} failed (exit "
                                f"{finished.returncode}); see {log or 'the output above'}")
        print(f"  done in {finished.seconds:.0f} s" + (f" (log: {log})" if log else ""),
              flush=True)

    def run_together(self, commands: Sequence[Command], jobs: Optional[int] = None,
                     show_output: Optional[bool] = None) -> None:
        """Run ``commands`` side by side, at most ``jobs`` at a time (default: all at once); each
        is named by its log file when it ends, whatever the order.

        Raises:
            CommandFailed: one or more exited non-zero (all ran); it names each and its log.
        """
        failures = []
        for finished in run_commands(commands, self.log_folder, self.env,
                                     jobs or max(1, len(commands)),
                                     self._shows_output(show_output)):
            if finished.returncode != 0:
                failures.append(f"{' '.join(finished.command.args[:2])} ... failed (exit "
                                f"{finished.returncode}); see {finished.log_path}")
            else:
                print(f"  {os.path.basename(finished.log_path)}: done in "
                      f"{finished.seconds:.0f} s", flush=True)
        if failures:
            raise CommandFailed("; ".join(failures))

    # ------------------------------------------------------------------------------- steps
    def preprocessed(self, dataset_name: str) -> bool:
        """Whether ``dataset_name`` has its plans and its preprocessed 2D data."""
        folder = os.path.join(self.folders["nnUNet_preprocessed"], dataset_name)
        return (os.path.isfile(os.path.join(folder, "nnUNetPlans.json"))
                and os.path.isdir(os.path.join(folder, "nnUNetPlans_2d")))

    @staticmethod
    def plan_and_preprocess_command(dataset_id: int, log_name: str = "plan_and_preprocess"
                                    ) -> Command:
        """``nnUNetv2_plan_and_preprocess`` of the 2D configuration, one process, checked."""
        return Command([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                        "-c", "2d", "-npfp", "1", "-np", "1", "--verify_dataset_integrity"],
                       log_name)

    def model_folder(self, dataset_name: str, trainer: str) -> str:
        """The model folder of ``trainer`` on ``dataset_name`` in the workdir's results."""
        return os.path.join(self.folders["nnUNet_results"], dataset_name,
                            f"{trainer}__nnUNetPlans__2d")

    def model_folders(self, dataset_name: str, trainers: Sequence[str] = TRAINERS
                      ) -> Tuple[str, ...]:
        """The model folders of ``trainers`` on ``dataset_name``: what :meth:`evaluate` takes."""
        return tuple(self.model_folder(dataset_name, t) for t in trainers)

    def trained(self, dataset_name: str, trainer: str) -> bool:
        """Whether ``trainer``'s fold 0 of ``dataset_name`` has its final checkpoint."""
        return os.path.isfile(final_checkpoint(self.model_folder(dataset_name, trainer), 0))

    def training_commands(self, dataset_id: int, dataset_name: str,
                          settings: Dict[str, dict], device: str, jobs: int = 1
                          ) -> List[Command]:
        """``nnUNetv2_train DATASET 2d 0 -tr TRAINER`` (:func:`training_command`) for every
        trainer of ``settings`` not trained yet, each with its settings written to
        ``WORKDIR/<trainer>.json``; ``jobs``: trainings at once."""
        commands = []
        for trainer, trainer_settings in settings.items():
            if self.trained(dataset_name, trainer):
                print(f"\n{trainer}: already trained, skipped", flush=True)
                continue
            commands.append(training_command(
                str(dataset_id), 0, trainer, trainer_settings,
                os.path.join(self.workdir, f"{trainer}.json"), device, jobs, f"train_{trainer}"))
        return commands

    def evaluate(self, options: EvalOptions) -> dict:
        """Run the evaluation ``options`` describe (:func:`nnunet_ima.evaluation.run.evaluate`)
        with the workdir's ``nnUNet_preprocessed`` and ``nnUNet_results``, passed in the
        options (the environment of this process is not changed), and print its tables.
        Returns the summary.

        The models are named by folder (:meth:`model_folders`) or by the dataset's full name
        and their trainers.

        Raises:
            UserInputError: a dataset id (it would be looked up in the user's nnU-Net folders),
                or any refusal of the evaluator.
        """
        from nnunet_ima.evaluation.report import print_tables
        from nnunet_ima.evaluation.run import evaluate
        if options.dataset and not options.dataset.startswith("Dataset"):
            raise UserInputError(f"an experiment names its dataset by its full name "
                                 f"(DatasetXXX_Name), not {options.dataset!r}")
        models = [os.path.basename(f) for f in options.model_folders] or list(options.trainers)
        print(f"\nevaluating {', '.join(models)} -> {options.output}", flush=True)
        summary = evaluate(dataclasses.replace(
            options, nnunet_preprocessed=self.folders["nnUNet_preprocessed"],
            nnunet_results=self.folders["nnUNet_results"]))
        print_tables(options.output)
        return summary


# ----------------------------------------------------------------------- benchmarks on real data
BENCHMARK_KEY = "nnunet_ima_benchmark"  # dataset.json's record of the options it was built with
BENCHMARK_STAGES = ("dataset", "preprocess", "train", "eval")


class BenchmarkError(RuntimeError):
    """A step of a benchmark's own failed (a download, an archive, the dataset); the message says
    which. A failed command raises :class:`CommandFailed`, naming its log."""


def same_grid(a: "sitk.Image", b: "sitk.Image", tolerance: float = 1e-4) -> bool:
    """Whether two SimpleITK images have the same size, spacing, origin and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def resample_nearest(image: "sitk.Image", reference: "sitk.Image") -> "sitk.Image":
    """``image`` (a label map) on ``reference``'s grid, nearest neighbour, 0 outside it."""
    import SimpleITK as sitk
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                         image.GetPixelID())


def write_raw_case(folder: str, case: str, image: "sitk.Image", label: "sitk.Image") -> None:
    """Write one case of an nnU-Net raw dataset: ``imagesTr/<case>_0000.nii.gz`` and
    ``labelsTr/<case>.nii.gz`` (one channel), compressed, with their geometry."""
    import SimpleITK as sitk
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    sitk.WriteImage(image, os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"),
                    useCompression=True)
    sitk.WriteImage(label, os.path.join(folder, "labelsTr", f"{case}.nii.gz"),
                    useCompression=True)


def write_dataset_json(folder: str, dataset_json: dict) -> None:
    """Write ``dataset.json`` into the raw dataset ``folder``, last and whole (through a
    temporary file): its presence marks a complete dataset."""
    with open(os.path.join(folder, "dataset.json.tmp"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    os.replace(os.path.join(folder, "dataset.json.tmp"), os.path.join(folder, "dataset.json"))


def check_recorded_options(raw_folder: str, wanted: dict) -> None:
    """Refuse a workdir whose dataset was built with other options than ``wanted`` (recorded
    under :data:`BENCHMARK_KEY` in its ``dataset.json``): its models, split and results would
    not be the ones asked for.

    Raises:
        BenchmarkError: the recorded options differ.
    """
    with open(os.path.join(raw_folder, "dataset.json")) as f:
        recorded = json.load(f).get(BENCHMARK_KEY)
    if recorded != wanted:
        raise BenchmarkError(f"{raw_folder} was built with {recorded}, not {wanted}: use another "
                             f"--workdir, or the options it was built with")


def add_benchmark_arguments(parser: argparse.ArgumentParser, stages: Sequence[str],
                            dataset_id: int, adv_eps: float, eps_max: float,
                            noise: Sequence[float], eval_cases_help: str,
                            epochs: int = 12) -> None:
    """The options every benchmark on real data takes: its steps, the trainings' short schedule
    (``epochs`` of 25 iterations by default) and attack, the evaluation. The dataset's own
    options are the script's."""
    p = parser
    p.add_argument("--dataset-id", type=int, default=dataset_id)
    p.add_argument("--stop-after", choices=stages, default=stages[-1])
    p.add_argument("--device", default="cpu", help="nnUNetv2_train -device / nnunet-ima-eval --device")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many of the three models at once (on a GPU with room for them)")
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs of each model")
    p.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=2)
    p.add_argument("--pgd-steps", type=int, default=5, help="PGD steps during training")
    p.add_argument("--adv-eps", type=float, default=adv_eps,
                   help="budget of vanilla adversarial training")
    p.add_argument("--eps-max", type=float, default=eps_max, help="IMA's largest margin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, nargs="+", default=list(noise),
                   help="evaluation noise levels (L2, z-score units, whole slice)")
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--eval-cases", nargs="+", help=eval_cases_help)
    p.add_argument("--max-slices", type=int, help="evaluate at most this many test slices")


def parse_benchmark_arguments(parser: argparse.ArgumentParser,
                              argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse a benchmark's command line; a ``--jobs`` or ``--val-iterations`` below 1 is refused
    (exit 2) before the workdir is made."""
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.val_iterations < 1:
        # nnU-Net's validation of an epoch averages over its iterations: 0 divides by zero.
        parser.error(f"--val-iterations must be >= 1, got {args.val_iterations}")
    return args


def trainer_settings(args: argparse.Namespace) -> Dict[str, dict]:
    """``NNUNET_IMA_CONFIG`` of each trainer of a benchmark (:func:`add_benchmark_arguments`):
    one schedule for all three, the attack for two."""
    schedule = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations,
                "num_val_iterations_per_epoch": args.val_iterations, "seed": args.seed}
    attack = {"pgd_steps": args.pgd_steps}
    return {"nnUNetTrainerClean": dict(schedule),
            "nnUNetTrainerAdv": dict(schedule, **attack, adv_eps=args.adv_eps),
            "nnUNetTrainerIMA": dict(schedule, **attack, eps_max=args.eps_max)}


def save_case_split(preprocessed: str, make_split: Callable[[List[str]], Dict[str, List[str]]],
                    seed: int, name: str, allow_test_in_val: bool = False) -> None:
    """Write the one-fold split ``make_split(cases)`` (``train`` / ``val`` / ``test`` lists) of
    the preprocessed dataset's cases (:func:`~nnunet_ima.nnunet.split_plan.save_split`) and say
    which cases went where."""
    from nnunet_ima.nnunet.split_plan import case_identifiers, save_split

    split = make_split(case_identifiers(preprocessed))
    save_split(preprocessed, split, seed, allow_test_in_val=allow_test_in_val)
    print(f"\nsplit ({name}): train {' '.join(split['train'])}; validation "
          f"{' '.join(split['val'])}; test {' '.join(split['test'])}", flush=True)


def run_benchmark(prog: str, args: argparse.Namespace, name: str,
                  build_dataset: Callable[[Experiment, str], bool],
                  write_split: Callable[[Experiment, str], None],
                  eval_cases: Sequence[str]) -> int:
    """A benchmark on real data, from its raw dataset ``Dataset{args.dataset_id}_{name}`` to the
    evaluation of the three models, in ``args.workdir``; a finished step is skipped (the
    evaluation resumes from its parts).

    ``build_dataset(experiment, raw folder)`` makes (or checks) the raw dataset; it returns
    ``False`` where ``args.stop_after`` is a step of its own before the dataset.
    ``write_split(experiment, preprocessed folder)`` writes ``splits_final.json`` and
    ``test_cases.json`` once the data is preprocessed (:func:`save_case_split`).
    ``eval_cases``: ``nnunet-ima-eval --cases`` unless ``args.eval_cases``.
    Returns the exit code: 1 where a step failed (:class:`BenchmarkError`,
    :class:`CommandFailed`), 2 where the evaluator refused its input, each with one
    ``PROG: error:`` line.
    """
    start = time.time()
    stop = args.stop_after
    experiment = Experiment(args.workdir)
    dataset_name = f"Dataset{args.dataset_id:03d}_{name}"
    try:
        if (not build_dataset(experiment, os.path.join(experiment.folders["nnUNet_raw"],
                                                       dataset_name))
                or stop == "dataset"):
            return 0
        preprocessed = os.path.join(experiment.folders["nnUNet_preprocessed"], dataset_name)
        if not experiment.preprocessed(dataset_name):
            experiment.run_together([experiment.plan_and_preprocess_command(args.dataset_id)])
        if not os.path.isfile(os.path.join(preprocessed, "test_cases.json")):
            write_split(experiment, preprocessed)
        if stop == "preprocess":
            return 0
        experiment.run_together(experiment.training_commands(
            args.dataset_id, dataset_name, trainer_settings(args), args.device, args.jobs),
            args.jobs)
        if stop == "train":
            return 0
        from nnunet_ima.evaluation.options import EvalOptions
        from nnunet_ima.evaluation.robustness import AttackSettings
        experiment.evaluate(EvalOptions(
            output=os.path.join(experiment.workdir, "robustness"),
            model_folders=experiment.model_folders(dataset_name),
            cases=tuple(args.eval_cases or eval_cases), max_slices=args.max_slices,
            noise=tuple(args.noise), attack=AttackSettings(steps=args.eval_steps),
            device=args.device))
    except (BenchmarkError, CommandFailed) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except UserInputError as e:  # the evaluator's refusal, as nnunet-ima-eval exits on it
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"\nfinished in {(time.time() - start) / 60:.1f} min; results in "
          f"{os.path.join(experiment.workdir, 'robustness')}", flush=True)
    return 0
