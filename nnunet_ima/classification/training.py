"""Training of a classifier with ``ce``, ``adv`` (vanilla PGD) or ``ima`` (IMA, Algorithm 1).

Every epoch draws its sample order and its attacks' random starts from generators seeded by
``(seed, epoch)``, and the checkpoint written after each epoch holds the model, optimiser,
margins and history: a run resumed from any epoch ends with the same model as one that never
stopped.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_ima.attacks import argmax_correct, bpgd, pgd
from nnunet_ima.classification.datasets import DatasetSplits, as_float
from nnunet_ima.config import IMAConfig
from nnunet_ima.errors import UserInputError
from nnunet_ima.losses import ima_loss
from nnunet_ima.margins import MarginStore

METHODS = ("ce", "adv", "ima")

# The paper's settings (METHOD section 7): eps_max of IMA, epochs, batch size, noise levels.
PAPER_DEFAULTS = {
    "moons": {"eps_max": 0.3, "epochs": 30, "batch_size": 128,
              "noise": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]},
    "digits": {"eps_max": 1.0, "epochs": 30, "batch_size": 128, "noise": [0.0, 0.5, 1.0, 1.5, 2.0]},
    "fashion-mnist": {"eps_max": 5.0, "epochs": 60, "batch_size": 128, "noise": [0.0, 0.5, 1.0, 2.0, 3.0]},
    "svhn": {"eps_max": 2.0, "epochs": 60, "batch_size": 128, "noise": [0.0, 0.1, 0.25, 0.5, 1.0]},
    "cifar10": {"eps_max": 1.5, "epochs": 100, "batch_size": 128, "noise": [0.0, 0.5, 1.0, 1.5]},
    "covid-ct": {"eps_max": 30.0, "epochs": 40, "batch_size": 32,
                 "noise": [0.0, 1.0, 3.0, 5.0, 10.0, 30.0]},
}


@dataclass
class TrainConfig:
    """Everything that defines a classification run (written to ``config.json``)."""

    dataset: str
    model: str
    method: str
    epochs: int
    batch_size: int
    lr: float = 1e-3
    seed: int = 0
    norm: str = "l2"
    eps: Optional[float] = None          # adv
    pgd_steps: int = 20
    pgd_alpha: float = 4.0
    eps_max: Optional[float] = None      # ima
    delta: Optional[float] = None
    beta: float = 0.5
    binary_steps: int = 10
    margin_update: str = "average"
    on_clean_wrong: str = "shrink"
    clip_min: str = "zero"
    max_train: Optional[int] = None
    data_root: Optional[str] = None
    moons_noise: float = 0.1

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserInputError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UserInputError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if self.method == "adv" and not (self.eps is not None and self.eps > 0):
            raise UserInputError(f"--eps must be > 0 for adversarial training, got {self.eps}")
        if self.method == "ima":
            try:
                self.ima_config()
            except ValueError as e:
                raise UserInputError(str(e)) from None

    def ima_config(self) -> IMAConfig:
        return IMAConfig(eps_max=self.eps_max, delta=self.delta, beta=self.beta,
                         binary_steps=self.binary_steps, margin_update=self.margin_update,
                         on_clean_wrong=self.on_clean_wrong, clip_min=self.clip_min)

    def to_dict(self) -> dict:
        return asdict(self)


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             device: torch.device = torch.device("cpu")) -> float:
    """Clean accuracy of ``model`` on stored samples ``x`` ``(N, ...)``, labels ``(N,)``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(as_float(x[i:i + batch_size]).to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


class Trainer:
    """One run: ``run()`` trains from the last checkpoint in ``out`` (or from scratch)."""

    def __init__(self, config: TrainConfig, data: DatasetSplits, model: torch.nn.Module, out: str,
                 device: torch.device, save_every: int = 0, progress: bool = True):
        self.config, self.data, self.out, self.device = config, data, out, device
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.save_every, self.progress = save_every, progress
        self.margins: Optional[MarginStore] = (config.ima_config().make_margin_store(config.epochs)
                                               if config.method == "ima" else None)
        self.history: List[dict] = []
        self.epoch = 0
        n = len(data.x_train) if config.max_train is None else min(config.max_train, len(data.x_train))
        self.n_train = n

    # ----------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> str:
        return os.path.join(self.out, "checkpoint_latest.pt")

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "history": self.history, "config": self.config.to_dict(),
                "margins": self.margins.state_dict() if self.margins is not None else None}

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def resume(self) -> bool:
        """Load ``checkpoint_latest.pt`` if present; returns whether it did."""
        path = self.checkpoint_path()
        if not os.path.isfile(path):
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["config"] != self.config.to_dict():
            raise UserInputError(f"{self.out} holds a run with other settings; choose another -o "
                                 f"or delete the folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], state["history"]
        if state["margins"] is not None:
            self.margins = MarginStore.from_state_dict(state["margins"])
        return True

    # -------------------------------------------------------------- training
    def _attack_kwargs(self) -> dict:
        c = self.config
        return {"norm": c.norm, "steps": c.pgd_steps, "alpha": c.pgd_alpha, "clamp": self.data.clamp}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, keys: List[int],
                   generator: torch.Generator) -> float:
        c = self.config
        if c.method == "ce":
            loss = F.cross_entropy(self.model(x), y)
        elif c.method == "adv":
            x_adv = pgd(self.model, x, y, c.eps, generator=generator, **self._attack_kwargs())
            loss = (F.cross_entropy(self.model(x), y) + F.cross_entropy(self.model(x_adv), y)) / 2
        else:
            logits = self.model(x)
            clean_loss = F.cross_entropy(logits, y, reduction="none")
            correct = argmax_correct(logits.detach(), y)
            idx = correct.nonzero().flatten()
            crossed = torch.zeros(len(y), dtype=torch.bool)
            distance = torch.zeros(len(y))
            adv_loss = clean_loss.new_zeros(0)
            if idx.numel():
                eps = self.margins.get([keys[i] for i in idx.tolist()], device=x.device)
                result = bpgd(self.model, x[idx], y[idx], eps, argmax_correct,
                              binary_steps=c.binary_steps, generator=generator,
                              **self._attack_kwargs())
                crossed[idx.cpu()] = result.found.cpu()
                distance[idx.cpu()] = result.distance.cpu().float()
                found = idx[result.found]
                if found.numel():
                    adv_loss = F.cross_entropy(self.model(result.x_boundary[result.found]), y[found],
                                               reduction="none")
            loss = ima_loss(clean_loss, adv_loss, c.beta)
            self.margins.record(keys, crossed, distance, correct.cpu())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def train_epoch(self) -> dict:
        c = self.config
        self.model.train()
        order = torch.randperm(self.n_train, generator=_generator(c.seed, self.epoch, 0))
        attack_generator = _generator(c.seed, self.epoch, 1)
        losses = []
        batches = range(0, self.n_train, c.batch_size)
        for start in tqdm(batches, desc=f"epoch {self.epoch + 1}/{c.epochs}", leave=False,
                          disable=not self.progress):
            idx = order[start:start + c.batch_size]
            x = as_float(self.data.x_train[idx]).to(self.device)
            y = self.data.y_train[idx].to(self.device)
            losses.append(self.train_step(x, y, idx.tolist(), attack_generator))
        row = {"epoch": self.epoch + 1, "loss": float(np.mean(losses)),
               "train_acc": accuracy(self.model, self.data.x_train[:self.n_train],
                                     self.data.y_train[:self.n_train], device=self.device),
               "val_acc": accuracy(self.model, self.data.x_val, self.data.y_val, device=self.device)}
        if self.margins is not None:
            stats = self.margins.end_epoch()
            row.update(mean_margin=stats.margin_mean, fraction_expanded=stats.fraction_expanded,
                       fraction_shrunk=stats.fraction_shrunk)
        return row

    def run(self) -> List[dict]:
        os.makedirs(self.out, exist_ok=True)
        self.resume()
        write_json(os.path.join(self.out, "config.json"), self.config.to_dict())
        while self.epoch < self.config.epochs:
            row = self.train_epoch()
            self.epoch += 1
            self.history.append(row)
            self.save(self.checkpoint_path())
            if self.save_every and self.epoch % self.save_every == 0:
                self.save(os.path.join(self.out, f"checkpoint_epoch_{self.epoch}.pt"))
            self.write_reports()
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in row.items()), flush=True)
        tmp = os.path.join(self.out, "model_final.pt.tmp")
        torch.save({"model": self.model.state_dict(), "config": self.config.to_dict()}, tmp)
        os.replace(tmp, os.path.join(self.out, "model_final.pt"))
        self.write_reports()
        return self.history

    def write_reports(self) -> None:
        from nnunet_ima.classification.plots import plot_accuracy, plot_margins
        if self.history:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(self.history[-1]))
            writer.writeheader()
            writer.writerows(self.history)
            write_text(os.path.join(self.out, "history.csv"), buffer.getvalue())
            plot_accuracy(self.history, os.path.join(self.out, "curves.png"),
                          f"{self.config.dataset} {self.config.method}")
        if self.margins is not None:
            write_json(os.path.join(self.out, "margins.json"), self.margins.state_dict())
            plot_margins(self.margins.values(), self.margins.eps_max,
                         os.path.join(self.out, "margins_hist.png"))


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))
