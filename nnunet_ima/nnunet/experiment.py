"""An nnU-Net experiment in one folder: plan and preprocess a dataset, train the Clean, Adv and
IMA trainers, evaluate the three models.

``nnunet-ima demo`` (a synthetic dataset) and ``benchmarks/pyradiomics_benchmark.py`` (real CT /
MR lesions) are two such experiments. An :class:`Experiment` gives its workdir its own
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``, runs the same commands a user
types, each shown and logged to ``WORKDIR/logs``, and skips a training whose final checkpoint
exists.

Same seed, same models: on a CPU a seeded training gives the same weights bit for bit every time
on one machine (augmentation in the training process, see
:func:`~nnunet_ima.nnunet.pipeline.data_augmentation_workers`; the blur without timing, see
:func:`~nnunet_ima.nnunet.data.without_timed_choices`), alone or side by side with others.
Another machine may give other weights: torch uses all its cores, and float sums depend on the
number of threads and on the CPU's instruction set. On a GPU a seeded training is not repeatable.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_json
from nnunet_ima.nnunet.paths import trainer_dir
from nnunet_ima.nnunet.pipeline import (Command, console_script, data_augmentation_workers,
                                        run_commands)

if TYPE_CHECKING:  # the evaluator imports torch; the experiment's commands need none of it
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
