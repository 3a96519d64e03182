"""A seeded training gives the same weights every time on one machine, whatever its load.

nnU-Net's Gaussian blur (``benchmark=True`` in its training pipeline) times FFT against direct
convolution on the first image of each size and kernel size and keeps the faster one. The two
round differently, and on a loaded machine the winner is close to a coin toss, so the demo's
seeded Clean and IMA models changed from one run to the next. These tests give the blur module a
fake clock on which FFT wins or loses at will, as a busy or an idle machine would make it.
"""
from __future__ import annotations

import glob
import os
import textwrap

import pytest
import torch

from nnunet_ima.nnunet.data import transforms_in, without_timed_choices
from nnunet_ima.nnunet.experiment import Experiment

TINY_SEEDED = {"num_epochs": 1, "num_iterations_per_epoch": 3,
               "num_val_iterations_per_epoch": 1, "seed": 0}

# Imported at the start of every Python process that has its folder on PYTHONPATH: with
# BLUR_TIMING=fft (or direct) the blur's benchmark sees FFT (or direct convolution) take half the
# time of the other; every process appends "pid blurs" to BLUR_COUNT_FILE when it exits.
SITECUSTOMIZE = textwrap.dedent('''
    import os
    if os.environ.get("BLUR_TIMING"):
        from batchgeneratorsv2.transforms.noise import gaussian_blur
        from fake_blur_clock import install
        install(gaussian_blur, fft_wins=os.environ["BLUR_TIMING"] == "fft",
                count_file=os.environ["BLUR_COUNT_FILE"])
''')

FAKE_CLOCK = textwrap.dedent('''
    import atexit, os

    def install(gaussian_blur, fft_wins, count_file=None):
        """Replace the blur module's clock and count its blurs (see tests/test_reproducible.py)."""
        state = {"now": 0.0, "calls": 0, "blurs": 0}

        def fake_time():
            # The benchmark times 9 direct, then 9 FFT blurs, reading the clock twice for each.
            call = state["calls"] % 36
            state["calls"] += 1
            if call % 2:  # the end of one timed blur
                timing_direct = call < 18
                state["now"] += 2.0 if timing_direct == fft_wins else 1.0
            return state["now"]

        blur_dimension = gaussian_blur.blur_dimension

        def counted(*args, **kwargs):
            state["blurs"] += 1
            return blur_dimension(*args, **kwargs)

        gaussian_blur.time = fake_time
        gaussian_blur.blur_dimension = counted
        if count_file:
            def report():
                with open(count_file, "a") as f:
                    f.write(f"{os.getpid()} {state['blurs']}\\n")
            atexit.register(report)
''')


@pytest.fixture
def fake_clock_folder(tmp_path):
    """A folder with the fake clock as a module and a ``sitecustomize`` that installs it."""
    folder = tmp_path / "fake_clock"
    folder.mkdir()
    (folder / "fake_blur_clock.py").write_text(FAKE_CLOCK)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return str(folder)


def nnunet_training_transforms():
    """nnU-Net's 2D training pipeline, as ``get_dataloaders`` builds it."""
    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return nnUNetTrainer.get_training_transforms(
        (48, 48), (-np.pi, np.pi), None, (0, 1), False, foreground_labels=[1, 2])


def blur_transforms(transforms):
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    return [t for t in transforms_in(transforms) if isinstance(t, GaussianBlurTransform)]


def test_nnunet_training_pipeline_blurs_without_timing():
    transforms = nnunet_training_transforms()
    blurs = blur_transforms(transforms)
    assert blurs and all(b.benchmark for b in blurs), "nnU-Net's pipeline no longer times its blur"
    assert without_timed_choices(transforms) is transforms
    assert not any(b.benchmark for b in blur_transforms(transforms))


def blurred(fft_wins: bool, fixed: bool, fake_clock_folder: str, monkeypatch) -> torch.Tensor:
    """A seeded image blurred by nnU-Net's blur on a machine where FFT wins (or loses)."""
    import numpy as np
    from batchgeneratorsv2.transforms.noise import gaussian_blur
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    monkeypatch.syspath_prepend(fake_clock_folder)
    from fake_blur_clock import install
    with monkeypatch.context() as m:
        # install() replaces these two; the context puts the originals back.
        m.setattr(gaussian_blur, "time", gaussian_blur.time)
        m.setattr(gaussian_blur, "blur_dimension", gaussian_blur.blur_dimension)
        install(gaussian_blur, fft_wins)
        blur = GaussianBlurTransform(blur_sigma=(0.5, 1.0), p_per_channel=1, benchmark=True)
        if fixed:
            without_timed_choices(blur)
        torch.manual_seed(0)
        np.random.seed(0)  # the blur draws its sigmas with numpy
        image = torch.rand(1, 48, 48)
        return blur(image=image.clone())["image"]


def test_blur_result_does_not_depend_on_timing(fake_clock_folder, monkeypatch):
    # The premise: nnU-Net's blur gives another image when FFT wins its timing.
    timed = [blurred(w, False, fake_clock_folder, monkeypatch) for w in (True, False)]
    assert not torch.equal(*timed), "the fake clock no longer decides the blur's method"
    fixed = [blurred(w, True, fake_clock_folder, monkeypatch) for w in (True, False)]
    assert torch.equal(*fixed)
    assert torch.equal(fixed[0], timed[1])  # direct convolution, as on a busy machine


def test_cpu_trainings_augment_in_the_main_process(tmp_path):
    # nnU-Net's worker processes hand out batches in the order they finish them (and seed
    # themselves from the OS): a seeded training is repeatable only without them.
    experiment = Experiment(str(tmp_path / "work"))
    (command,) = experiment.training_commands(990, "Dataset990_SyntheticOrgan",
                                              {"nnUNetTrainerClean": TINY_SEEDED}, "cpu", jobs=3)
    assert command.env["nnUNet_n_proc_DA"] == "0"


def final_weights(experiment: Experiment, dataset_name: str, trainer: str) -> dict:
    (path,) = glob.glob(os.path.join(experiment.folders["nnUNet_results"], dataset_name,
                                     f"{trainer}__nnUNetPlans__2d", "fold_0",
                                     "checkpoint_final.pth"))
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


@pytest.mark.slow
def test_seeded_training_gives_the_same_weights_whatever_the_load(nnunet_workspace, tmp_path,
                                                                    fake_clock_folder):
    """``nnUNetv2_train`` as the demo runs it, twice with one seed: once where FFT wins the blur's
    timing, once where direct convolution wins. The final weights are the same bit for bit."""
    ws = nnunet_workspace
    trainer = "nnUNetTrainerClean"
    weights = {}
    for timing in ("fft", "direct"):
        experiment = Experiment(str(tmp_path / timing))
        os.symlink(os.path.join(ws.preprocessed, ws.dataset_name),
                   os.path.join(experiment.folders["nnUNet_preprocessed"], ws.dataset_name))
        (command,) = experiment.training_commands(ws.dataset_id, ws.dataset_name,
                                                  {trainer: TINY_SEEDED}, "cpu")
        count_file = str(tmp_path / f"blurs_{timing}.txt")
        command.env.update(BLUR_TIMING=timing, BLUR_COUNT_FILE=count_file,
                           PYTHONPATH=os.pathsep.join(
                               p for p in (fake_clock_folder, os.environ.get("PYTHONPATH")) if p))
        experiment.run(command)
        with open(count_file) as f:
            blurs = sum(int(line.split()[1]) for line in f)
        assert blurs > 0, "no training sample was blurred: the test would prove nothing"
        weights[timing] = final_weights(experiment, ws.dataset_name, trainer)

    differing = {name: (weights["fft"][name].double() - weights["direct"][name].double())
                 .abs().max().item()
                 for name in weights["fft"] if not torch.equal(weights["fft"][name],
                                                               weights["direct"][name])}
    assert not differing, (f"{len(differing)} of {len(weights['fft'])} weight tensors differ "
                           f"(largest difference {max(differing.values()):.3g})")
