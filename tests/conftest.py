"""Shared fixtures: a real nnU-Net workspace with a tiny planned and preprocessed dataset.

``nnunet_workspace`` runs the real ``nnUNetv2_plan_and_preprocess -c 2d`` and ``nnunet-ima
split`` once per test session; ``trained_clean_model`` trains plain nnU-Net on it briefly with
the real ``nnUNetv2_train``. Both set nnU-Net's environment variables in ``os.environ`` for the
session (nnU-Net reads them when its modules are imported, so in-process tests see them too).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List

import pytest
import torch

from nnunet_ima.nnunet.paths import trainer_dir
from nnunet_ima.nnunet.synthetic import write_synthetic_dataset

DATASET_ID = 990
DATASET_NAME = "Dataset990_SyntheticOrgan"


@dataclass
class NNUNetWorkspace:
    """Folders and environment of the session's nnU-Net workspace."""

    root: str
    raw: str
    preprocessed: str
    results: str
    dataset_id: int = DATASET_ID
    dataset_name: str = DATASET_NAME
    env: Dict[str, str] = field(default_factory=dict)

    def run(self, args: List[str], extra_env: Dict[str, str] = None, check: bool = True,
            timeout: int = 900) -> subprocess.CompletedProcess:
        """Run a command with the workspace's environment; output captured as text."""
        env = dict(self.env, **(extra_env or {}))
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout,
                                cwd=self.root)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
        return result

    def write_config(self, name: str, values: dict) -> str:
        """Write an ``NNUNET_IMA_CONFIG`` JSON file; returns its path."""
        path = os.path.join(self.root, name)
        with open(path, "w") as f:
            json.dump(values, f)
        return path

    def model_folder(self, trainer: str, configuration: str = "2d") -> str:
        return os.path.join(self.results, self.dataset_name,
                            f"{trainer}__nnUNetPlans__{configuration}")


def _bin(name: str) -> str:
    """A console script of this Python environment."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


@pytest.fixture(scope="session")
def nnunet_workspace(tmp_path_factory) -> NNUNetWorkspace:
    root = str(tmp_path_factory.mktemp("nnunet"))
    ws = NNUNetWorkspace(root=root, raw=os.path.join(root, "nnUNet_raw"),
                         preprocessed=os.path.join(root, "nnUNet_preprocessed"),
                         results=os.path.join(root, "nnUNet_results"))
    for folder in (ws.raw, ws.preprocessed, ws.results):
        os.makedirs(folder)
    variables = {"nnUNet_raw": ws.raw, "nnUNet_preprocessed": ws.preprocessed,
                 "nnUNet_results": ws.results, "nnUNet_def_n_proc": "1",
                 "nnUNet_extTrainer": trainer_dir()}
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    ws.env = {k: v for k, v in os.environ.items() if k != "NNUNET_IMA_CONFIG"}
    ws.env.setdefault("OMP_NUM_THREADS", "2")

    write_synthetic_dataset(ws.raw, DATASET_ID, num_training=8, shape=(16, 48, 48), seed=0)
    # nnUNet_n_proc_DA=0 must not be set while planning (nnunetv2 2.8.1 fails on it).
    ws.run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d",
            "-npfp", "1", "-np", "1", "--verify_dataset_integrity"])
    # One fold per non-test case: fold 0 trains on 5 cases and validates on 1, the sizes the
    # tests' expectations were set for.
    ws.run([_bin("nnunet-ima"), "split", "-d", str(DATASET_ID), "--test", "2", "--folds", "6",
            "--seed", "0"])
    ws.env["nnUNet_n_proc_DA"] = "0"
    yield ws
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def train(ws: NNUNetWorkspace, trainer: str, config: dict, extra_args: List[str] = (),
          check: bool = True, configuration: str = "2d") -> subprocess.CompletedProcess:
    """``nnUNetv2_train ID CONFIGURATION 0 -tr TRAINER -device cpu`` with ``config`` as
    NNUNET_IMA_CONFIG."""
    suffix = "" if configuration == "2d" else f"_{configuration}"
    path = ws.write_config(f"{trainer}{suffix}.json", config)
    return ws.run([_bin("nnUNetv2_train"), str(ws.dataset_id), configuration, "0", "-tr",
                   trainer, "-device", "cpu", *extra_args],
                  extra_env={"NNUNET_IMA_CONFIG": path}, check=check)


@pytest.fixture(scope="session")
def trained_clean_model(nnunet_workspace) -> str:
    """Model folder of plain nnU-Net trained for 80 iterations (Dice ~0.9 organ, ~0.7 lesion)."""
    # Seeded: the evaluator tests see the same model on every run of the suite.
    train(nnunet_workspace, "nnUNetTrainerClean",
          {"num_epochs": 8, "num_iterations_per_epoch": 10, "num_val_iterations_per_epoch": 1,
           "seed": 0})
    return nnunet_workspace.model_folder("nnUNetTrainerClean")


DATASET_3D_ID = 996
DATASET_3D_NAME = "Dataset996_SyntheticOrgan3d"


@pytest.fixture(scope="session")
def nnunet_workspace_3d(tmp_path_factory) -> NNUNetWorkspace:
    """A second workspace with a tiny 3D dataset planned for ``3d_fullres``: 6 training cases
    and 2 test cases (``imagesTs`` / ``labelsTs``) of 16 x 32 x 32 voxels at 1 mm isotropic, so
    that nnU-Net's preprocessing keeps the voxel grid (no resampling; the images hold no zeros,
    so no crop) and the patch is the whole volume. Its environment lives in ``env`` only (the
    2D workspace owns ``os.environ``): run commands with :meth:`NNUNetWorkspace.run`, or pass
    the folders to the evaluator's options."""
    root = str(tmp_path_factory.mktemp("nnunet3d"))
    ws = NNUNetWorkspace(root=root, raw=os.path.join(root, "nnUNet_raw"),
                         preprocessed=os.path.join(root, "nnUNet_preprocessed"),
                         results=os.path.join(root, "nnUNet_results"), dataset_id=DATASET_3D_ID,
                         dataset_name=DATASET_3D_NAME)
    for folder in (ws.raw, ws.preprocessed, ws.results):
        os.makedirs(folder)
    ws.env = {k: v for k, v in os.environ.items() if k != "NNUNET_IMA_CONFIG"}
    ws.env.update({"nnUNet_raw": ws.raw, "nnUNet_preprocessed": ws.preprocessed,
                   "nnUNet_results": ws.results, "nnUNet_def_n_proc": "1",
                   "nnUNet_extTrainer": trainer_dir()})
    ws.env.setdefault("OMP_NUM_THREADS", "2")
    write_synthetic_dataset(ws.raw, DATASET_3D_ID, name="SyntheticOrgan3d", num_training=6,
                            num_test=2, shape=(16, 32, 32), spacing=(1.0, 1.0, 1.0), seed=0)
    ws.run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_3D_ID), "-c", "3d_fullres",
            "-npfp", "1", "-np", "1", "--verify_dataset_integrity"])
    ws.env["nnUNet_n_proc_DA"] = "0"
    return ws


@pytest.fixture
def one_thread():
    """Tiny networks: intra-op threads only add synchronisation (and stall on a busy CPU).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tests that run real nnU-Net (planning, training, prediction) or train classification models
# for many epochs are the slow tier: `pytest -m "not slow"` is the developers' loop, CI runs all.
SLOW_FIXTURES = {"nnunet_workspace", "nnunet_workspace_3d", "trained_clean_model", "moons_runs"}
SLOW_MODULES = {"test_ddp_training", "test_demo", "test_benchmark_scripts", "test_packaging",
                "test_classification_compare"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def cnn_batch():
    """A 3-class float64 CNN in eval mode and 6 images (6, 1, 8, 8) in [0, 1] with labels."""
    from core_models import SmallCNN
    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y
