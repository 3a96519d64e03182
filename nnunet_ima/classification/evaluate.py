"""Attack the final models of run folders: robust accuracy per noise level, worst case of the
attacks, with gradient-masking warnings; each run's report goes to ``RUN/eval_<norm>.json``."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ima.classification.datasets import DatasetSplits
from nnunet_ima.classification.models import build_model
from nnunet_ima.classification.robust_eval import (ATTACK_LOSSES, MASKING_THRESHOLD_POINTS,
                                                   PGD_WORST, WORST, auc_of, masking_warnings,
                                                   robust_accuracy)
from nnunet_ima.classification.runs import ExecutionOptions, load_run, load_run_data
from nnunet_ima.classification.settings import PAPER_SETTINGS
from nnunet_ima.classification.strong_attacks import (ATTACKS, StrongAttackSettings, caption,
                                                      check_attacks, settings_record)
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_json
from nnunet_ima.norms import NORMS

DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True)
class EvalOptions:
    """What `eval` computes (everything its reports depend on); a bad value is a
    :class:`UserInputError` naming the `eval` option.

    ``noise``: the levels (``None``: the paper's for each run's dataset); ``steps``: PGD and
    APGD iterations (PGD's step is noise / 10); ``attacks``: the attacks whose worst case is
    reported; ``batch_size``: test samples per attack batch (each batch draws its own seeded
    random starts, so results depend on it); ``max_samples``: the first N test samples only.
    """

    norm: str = "l2"
    noise: Optional[Tuple[float, ...]] = None
    steps: int = DEFAULT_STEPS
    attacks: Tuple[str, ...] = tuple(ATTACK_LOSSES)
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    max_samples: Optional[int] = None
    strong: StrongAttackSettings = field(default_factory=StrongAttackSettings)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UserInputError(f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.noise is not None and any(not n >= 0 for n in self.noise):
            raise UserInputError(f"--noise levels must be >= 0, got {list(self.noise)}")
        if self.steps < 1:
            raise UserInputError(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserInputError(f"--max-samples must be >= 1, got {self.max_samples}")
        spsa = self.strong.spsa
        for flag, value in (("--apgd-restarts", self.strong.apgd_restarts),
                            ("--spsa-iterations", spsa.iterations), ("--spsa-samples", spsa.samples)):
            if value < 1:
                raise UserInputError(f"{flag} must be >= 1, got {value}")
        if not spsa.delta > 0:
            raise UserInputError(f"--spsa-delta must be > 0, got {spsa.delta}")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise UserInputError(f"--attacks {unknown}: not attacks; choose from {list(ATTACKS)}")

    def noise_levels(self, dataset: str) -> List[float]:
        """The sorted, distinct noise levels of a run on ``dataset``."""
        return sorted(set(self.noise if self.noise is not None
                          else PAPER_SETTINGS[dataset].noise))

    def report_path(self, folder: str) -> str:
        return os.path.join(folder, f"eval_{self.norm}.json")


def warning_message(run: str, options: EvalOptions, w: dict) -> str:
    """The text of a gradient-masking warning of ``run`` (``w``: one of ``masking_warnings``)."""
    pgd_losses = [a for a in options.attacks if a in ATTACK_LOSSES]
    return (f"run {run}, {options.norm.upper()} noise {w['noise']:g}: {options.steps}-PGD "
            f"({', '.join(pgd_losses)}) {100 * w['pgd']:.2f} % is {w['points']:.2f} points above "
            f"{ATTACKS[w['attack']].label} {100 * w['accuracy']:.2f} % (more than "
            f"{MASKING_THRESHOLD_POINTS:g}): PGD's gradients may be masked; trust the stronger "
            f"attack")


def evaluate_runs(folders: Sequence[str], options: EvalOptions,
                  execution: ExecutionOptions) -> List[Tuple[str, dict]]:
    """Attack the final model of every run folder; writes ``eval_<norm>.json`` into each folder
    and returns ``(run name, report)`` per folder."""
    device = execution.device
    # Every folder, its data and the attacks it can take are checked before any attack runs,
    # so a typo in the last one (or apgd-dlr on 2 classes) wastes nothing.
    runs = [(folder, *load_run(folder, device)) for folder in folders]
    datasets: Dict[tuple, DatasetSplits] = {}
    for folder, config, _ in runs:
        key = (config.dataset, config.data_root, config.data_seed, config.moons_noise)
        if key not in datasets:
            datasets[key] = load_run_data(folder, config)
        check_attacks(options.attacks, datasets[key].num_classes,
                      where=f"{folder} ({config.dataset})")
    rows = []
    for folder, config, weights in runs:
        data = datasets[(config.dataset, config.data_root, config.data_seed, config.moons_noise)]
        model = build_model(config.model, data.num_classes, data.input_shape)
        model.load_state_dict(weights)
        model = model.to(device).eval()
        execution.set_threads(model)
        noise = options.noise_levels(config.dataset)
        x, y = data.x_test, data.y_test
        if options.max_samples:
            x, y = x[:options.max_samples], y[:options.max_samples]
        result = robust_accuracy(model, x, y, noise, options.norm, options.steps,
                                 list(options.attacks), data.clamp, options.batch_size,
                                 options.seed, device, progress=execution.progress,
                                 settings=options.strong)
        name = os.path.basename(os.path.normpath(folder))
        warnings = masking_warnings(result, list(options.attacks))
        for w in warnings:
            w["message"] = warning_message(name, options, w)
            print(f"nnunet-ima-classify eval: warning: {w['message']}", file=sys.stderr)
        report = {"noise": {f"{n:g}": result[WORST][n] for n in noise}, "auc": auc_of(result[WORST]),
                  "attacks": list(options.attacks),
                  "caption": caption(list(options.attacks), options.steps),
                  "n": len(x), "norm": options.norm, "steps": options.steps,
                  "step_size": "noise / 10", "seed": options.seed,
                  "max_samples": options.max_samples, "batch_size": options.batch_size,
                  "attack_settings": settings_record(list(options.attacks), options.steps,
                                                     options.strong),
                  "per_attack": {a: {f"{n:g}": result[a][n] for n in noise}
                                 for a in options.attacks},
                  "warnings": warnings}
        if PGD_WORST in result:
            report["pgd_worst"] = {f"{n:g}": result[PGD_WORST][n] for n in noise}
        write_json(options.report_path(folder), report, sort_keys=False)
        rows.append((name, report))
    return rows


def report_is_current(folder: str, options: EvalOptions, dataset: str, model_path: str) -> bool:
    """Whether ``folder/eval_<norm>.json`` already holds this evaluation of the model in
    ``model_path`` (it is newer than the model and was made with the same options)."""
    path = options.report_path(folder)
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(model_path):
        return False
    try:
        with open(path) as f:
            report = json.load(f)
    except ValueError:
        return False
    expected_settings = json.loads(json.dumps(settings_record(
        list(options.attacks), options.steps, options.strong)))
    expected_noise = sorted(f"{n:g}" for n in options.noise_levels(dataset))
    return (report.get("attacks") == list(options.attacks) and report.get("steps") == options.steps
            and report.get("seed") == options.seed
            and sorted(report.get("noise", {})) == expected_noise
            and report.get("max_samples") == options.max_samples
            and report.get("batch_size") == options.batch_size
            and report.get("attack_settings") == expected_settings)


def load_report(folder: str, norm: str) -> dict:
    """The ``eval_<norm>.json`` report of a run folder."""
    with open(os.path.join(folder, f"eval_{norm}.json")) as f:
        return json.load(f)
