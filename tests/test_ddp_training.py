"""The adversarial trainers under nnU-Net's DDP: two gloo processes on CPU, real training loop.

Each rank builds the trainer the way ``nnUNetv2_train -num_gpus 2`` does (process group first,
then the trainer, then ``run_training``), on the session's tiny preprocessed dataset.
"""
from __future__ import annotations

import json
import os
import socket
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

from nnunet_ima.nnunet.margin_checkpoint import margins_path
from nnunet_ima.margins import MarginStore
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv
from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA

EPOCHS, ITERATIONS = 2, 3
# A low Dice threshold makes most slices "correct" from the first step, so BPGD runs on every
# rank and the ranks train on different numbers of boundary points.
CONFIG = {"num_epochs": EPOCHS, "num_iterations_per_epoch": ITERATIONS,
          "num_val_iterations_per_epoch": 1, "pgd_steps": 3, "dice_threshold": 0.05, "seed": 0}
# Each trainer is given only keys it reads (a trainer refuses the others).
CONFIGS = {"ima": dict(CONFIG, binary_steps=2, eps_max=10.0), "adv": dict(CONFIG, adv_eps=5.0)}


class RecordingMixin:
    """Keeps what this rank trained on, for the test to compare across ranks."""

    def on_train_start(self):
        super().on_train_start()
        self.cases, self.recorded_keys, self.adversarial_counts = [], [], []

    def after_step(self, batch, adversarial, adversarial_dice):
        super().after_step(batch, adversarial, adversarial_dice)
        self.cases += [str(k) for k in batch["keys"]]
        evidence = adversarial.evidence
        self.recorded_keys += [list(k) for k in (evidence.keys if evidence is not None else [])]
        self.adversarial_counts.append(int(adversarial.x.shape[0]))


class nnUNetTrainerIMA_DDPTest(RecordingMixin, nnUNetTrainerIMA):
    pass


class nnUNetTrainerAdv_DDPTest(RecordingMixin, nnUNetTrainerAdv):
    pass


TRAINERS = {"ima": nnUNetTrainerIMA_DDPTest, "adv": nnUNetTrainerAdv_DDPTest}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank: int, world_size: int, port: int, kind: str, preprocessed: str,
                out_dir: str) -> None:
    import torch.distributed as dist
    from batchgenerators.utilities.file_and_folder_operations import load_json
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        plans = load_json(os.path.join(preprocessed, "nnUNetPlans.json"))
        plans["continue_training"] = False  # what nnU-Net's get_trainer_from_args adds
        dataset_json = load_json(os.path.join(preprocessed, "dataset.json"))
        trainer = TRAINERS[kind](plans, "2d", 0, dataset_json, torch.device("cpu"))
        trainer.run_training()
        result = {
            "output_folder": trainer.output_folder,
            "batch_size": trainer.batch_size,
            "parameters": {k: v.tolist() for k, v in trainer.attack_network.state_dict().items()},
            "cases": trainer.cases,
            "recorded_keys": trainer.recorded_keys,
            "adversarial_counts": trainer.adversarial_counts,
            "margins": trainer.margins.state_dict() if kind == "ima" else None,
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(ws, kind: str, out_dir) -> list:
    config = ws.write_config(f"ddp_{kind}.json", CONFIGS[kind])
    # The spawned ranks inherit the environment; patch.dict restores it afterwards.
    with mock.patch.dict(os.environ, {"NNUNET_IMA_CONFIG": config, "nnUNet_n_proc_DA": "0"}):
        mp.spawn(_train_rank, nprocs=2, join=True,
                 args=(2, _free_port(), kind, os.path.join(ws.preprocessed, ws.dataset_name),
                       str(out_dir)))
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ima_ranks(nnunet_workspace, tmp_path_factory):
    """[rank 0 result, rank 1 result] of a two-rank nnUNetTrainerIMA run."""
    return _run_two_ranks(nnunet_workspace, "ima", tmp_path_factory.mktemp("ddp_ima"))


@pytest.fixture(scope="module")
def adv_ranks(nnunet_workspace, tmp_path_factory):
    """[rank 0 result, rank 1 result] of a two-rank nnUNetTrainerAdv run."""
    return _run_two_ranks(nnunet_workspace, "adv", tmp_path_factory.mktemp("ddp_adv"))


@pytest.mark.parametrize("run", ["ima_ranks", "adv_ranks"])
def test_two_gloo_ranks_train_the_same_network(run, request):
    ranks = request.getfixturevalue(run)
    # Both ranks sampled their own batches ...
    assert ranks[0]["cases"] != ranks[1]["cases"]
    # ... and, with the gradients averaged every step, hold the same weights at the end.
    for name, value in ranks[0]["parameters"].items():
        assert torch.equal(torch.tensor(value), torch.tensor(ranks[1]["parameters"][name])), name

    with open(os.path.join(ranks[0]["output_folder"], "ima_stats.csv")) as f:
        lines = f.read().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    global_batch = ranks[0]["batch_size"] + ranks[1]["batch_size"]
    assert all(int(r["samples"]) == ITERATIONS * global_batch for r in rows)  # both ranks counted


def test_two_gloo_ranks_hold_the_same_ima_margins(ima_ranks):
    ranks = ima_ranks
    assert ranks[0]["margins"] == ranks[1]["margins"]
    counts = [r["adversarial_counts"] for r in ranks]
    assert sum(map(sum, counts)) > 0, "no rank trained on a boundary point: BPGD never crossed"
    merged = MarginStore.from_state_dict(ranks[0]["margins"])
    recorded = {tuple(k) for r in ranks for k in r["recorded_keys"]}
    assert set(merged.keys()) == recorded  # every slice either rank saw, and nothing else

    # Rank 0 saved the merged margins beside the final checkpoint.
    final = os.path.join(ranks[0]["output_folder"], "checkpoint_final.pth")
    with open(margins_path(final)) as f:
        saved = json.load(f)["states"][-1]
    assert saved["current_epoch"] == EPOCHS
    assert MarginStore.from_state_dict(saved["margins"]).state_dict() == merged.state_dict()
