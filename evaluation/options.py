"""What one evaluation scores and how: :class:`EvalOptions`.

``nnunet-ima-eval`` builds it once from its command line; :func:`.run.evaluate` and the steps
it calls read it (and nothing else), so a program can run the same evaluation without argparse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from nnunet_ima.devices import default_device

from nnunet_ima.evaluation.masking import MaskingSettings
from nnunet_ima.evaluation.robustness import AttackSettings
from nnunet_ima.evaluation.training_cases import Fold

INFERENCE_PATHS = ("network", "predictor")

DEFAULT_NOISE = (0.0, 5.0, 15.0, 25.0)  # the paper's Heart levels (METHOD section 6)


@dataclass(frozen=True)
class EvalOptions:
    """One evaluation: the models, the test slices, the attack and the output folder.

    Attributes:
        output: the output folder (created if missing; a rerun with the same options resumes
            in it).
        dataset, trainers, plans, configuration: the models by nnU-Net names, one per trainer,
            under ``nnUNet_results``; unused when ``model_folders`` is given.
        model_folders: model folders (``.../Trainer__Plans__2d``) instead of nnU-Net names.
        folds: nnU-Net folds (numbers or ``"all"``); with several, each fold is one model.
        checkpoint: ``final``, ``best`` or ``latest``.
        cases: ``test``, ``val`` and/or case identifiers; empty: ``test`` when
            ``test_cases.json`` exists, else ``val`` (with ``images``: every case there).
        allow_train_cases: score cases that a model's fold trained on (refused otherwise).
        images, labels: raw test folders (``imagesTs``, ``labelsTs``) instead of the
            preprocessed dataset; preprocessed with each model's plans.
        include_empty: also score slices without foreground in the ground truth.
        max_slices: score at most this many slices per model, drawn with ``attack.seed``.
        noise: noise levels (0 = clean), in z-score units; any order, repeats ignored.
        attack: the attack and its options; its seed also draws the ``max_slices`` slices.
        ensemble: members of :data:`.ensemble.MEMBERS` to run in turn, the headline being their
            per-slice worst case (``attack`` then gives only the shared norm, steps, alpha,
            random start, batch size and seed); empty: ``attack`` alone.
        masking_checks: run the gradient-masking checks of :mod:`.masking` after the attacks,
            with ``masking`` (slices, queries).
        inference: ``network`` (the 2D network on whole slices, padded to its stride) or
            ``predictor`` (nnU-Net's sliding-window predictor, :mod:`.predictor_path`, with
            ``tile_step_size`` and mirroring unless ``disable_tta``).
        device: torch device name (``cpu``, ``cuda``, ``cuda:1``, ...).
        overwrite: discard results in ``output`` made with other options instead of refusing.
        progress: show a progress bar.
    """

    output: str
    dataset: Optional[str] = None
    trainers: Tuple[str, ...] = ("nnUNetTrainer",)
    plans: str = "nnUNetPlans"
    configuration: str = "2d"
    model_folders: Tuple[str, ...] = ()
    folds: Tuple[Fold, ...] = (0,)
    checkpoint: str = "final"
    cases: Tuple[str, ...] = ()
    allow_train_cases: bool = False
    images: Optional[str] = None
    labels: Optional[str] = None
    include_empty: bool = False
    max_slices: Optional[int] = None
    noise: Tuple[float, ...] = DEFAULT_NOISE
    attack: AttackSettings = AttackSettings()
    ensemble: Tuple[str, ...] = ()
    masking_checks: bool = False
    masking: MaskingSettings = MaskingSettings()
    inference: str = "network"
    tile_step_size: float = 0.5
    disable_tta: bool = False
    device: str = field(default_factory=default_device)
    overwrite: bool = False
    progress: bool = True

    @property
    def noise_levels(self) -> List[float]:
        """The distinct noise levels, ascending: the order of the attacks and of the tables."""
        return sorted(set(float(n) for n in self.noise))
