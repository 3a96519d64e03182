"""Training of a classifier with ``ce``, ``adv`` (vanilla PGD), ``ima`` (IMA, Algorithm 1) or one
of the baselines of ``nnunet_ima.classification.baselines`` (TRADES, MMA, DDN, FAT, GAIRAT).

Reproducibility: the sample order and the attacks' random starts of epoch ``e`` come from
generators seeded by ``(seed, e)``, so a run resumed after epoch ``e`` draws exactly what an
uninterrupted run draws; the global torch / NumPy / Python RNG states (used by layers such as
dropout) are saved in every checkpoint and restored too. A resumed run therefore ends with the
same model as one that never stopped.
"""
from __future__ import annotations

import csv
import io
import os
import random
import time
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_ima.adversarial_step import IMAStep, PGDStep
from nnunet_ima.attacks import argmax_correct
from nnunet_ima.classification.baselines import BASELINES, BatchContext
from nnunet_ima.classification.datasets import DatasetSplits, as_float
from nnunet_ima.classification.settings import TrainConfig
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import save_torch, write_json, write_text
from nnunet_ima.losses import ima_loss
from nnunet_ima.margins import MarginStore

CHECKPOINT_FORMAT = "nnunet_ima.classification/1"
LATEST = "checkpoint_latest.pt"
FINAL = "model_final.pt"
PLOT_INTERVAL_S = 60.0
"""During training the figures are redrawn at most this often (a redraw costs about a second;
a short epoch should not wait for it); the CSV and the margins are written every epoch."""


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream`` 0: sample order, 1: attacks) of one epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


def rng_states() -> Dict[str, object]:
    """The global RNG states (torch CPU and CUDA, NumPy, Python)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: Dict[str, object]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate_clean(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   device: torch.device, batch_size: int = 1024) -> Dict[str, float]:
    """Clean accuracy and mean cross-entropy of ``model`` (eval mode) on stored samples.

    ``x``: ``(N, ...)`` stored samples (uint8 images or float points), ``y``: ``(N,)``.
    """
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        logits = model(as_float(x[i:i + batch_size]).to(device))
        yb = y[i:i + batch_size].to(device)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    n = max(len(x), 1)
    return {"acc": correct / n, "loss": loss / n}


def _attack_statistics(totals: Dict[str, float], n: int, method: str) -> Dict[str, float]:
    """The history columns of an epoch's attack counts (``totals``: sums over its batches)."""
    row = {}
    if "adv_wrong" in totals:
        row["fraction_adv_wrong"] = totals["adv_wrong"] / n
    if method == "mma":
        row["fraction_crossed"] = totals["crossed"] / n
        row["mean_margin"] = totals["margin_sum"] / totals["crossed"] if totals["crossed"] \
            else float("nan")
    if "found" in totals:
        row["fraction_found"] = totals["found"] / n
    if "tau" in totals:
        row["tau"] = totals["tau"] / n
        row["fraction_stopped"] = totals["stopped"] / n
    if "kappa_sum" in totals:
        row["mean_kappa"] = totals["kappa_sum"] / n
    return row


def adversarial_step(config: TrainConfig,
                     clamp: Optional[tuple]) -> Union[PGDStep, IMAStep, None]:
    """The adversarial step of ``adv`` (PGD at ``eps``, the halves of the segmentation baseline)
    and ``ima`` (Algorithm 1 as printed, argmax correctness); ``None`` for the other methods."""
    if config.method == "adv":
        return PGDStep(config.eps, config.attack, weight=0.5, clamp=clamp)
    if config.method == "ima":
        return IMAStep(config.ima, config.attack, argmax_correct, clamp=clamp)
    return None


class Trainer:
    """One run in folder ``out``: :meth:`run` trains from its last checkpoint or from scratch.

    Args:
        config: the validated run settings.
        data: the dataset; training sample ``i`` is row ``i`` of ``data.x_train`` (its margin key).
        model: the freshly initialised network (its weights are replaced when resuming).
        save_every: also keep ``checkpoint_epoch_N.pt`` every ``N`` epochs (0: never).
    """

    def __init__(self, config: TrainConfig, data: DatasetSplits, model: torch.nn.Module, out: str,
                 device: torch.device, save_every: int = 0, progress: bool = True):
        self.config, self.data, self.out, self.device = config, data, out, device
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.save_every, self.progress = save_every, progress
        self.margins: Optional[MarginStore] = (config.ima.make_margin_store(config.epochs)
                                               if config.method == "ima" else None)
        self.adversarial_step = adversarial_step(config, data.clamp)
        self.history: List[dict] = []
        self.epoch = 0
        self._last_plot = float("-inf")
        self.n_train = len(data.x_train) if config.max_train is None \
            else min(config.max_train, len(data.x_train))

    # ----------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "history": self.history, "config": self.config.to_dict(), "rng": rng_states(),
                "margins": self.margins.state_dict() if self.margins is not None else None}

    def load_checkpoint(self, path: str) -> None:
        """Continue from ``path``; a checkpoint of another configuration is a UserInputError."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # a truncated or foreign file: say which one
            raise UserInputError(f"{path} cannot be loaded ({type(e).__name__}: {e}); delete it to "
                                 f"start the run again") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserInputError(f"{path} is not a checkpoint of nnunet-ima-classify")
        saved = TrainConfig.from_dict(state["config"])
        differences = saved.differences(self.config)
        if differences:
            raise UserInputError(f"{self.out} holds a run with other settings "
                                 f"({'; '.join(differences)}; saved != asked); use another -o, "
                                 f"repeat the saved settings, or delete the folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        if state["margins"] is not None:
            self.margins = MarginStore.from_state_dict(state["margins"])
        set_rng_states(state["rng"])

    # -------------------------------------------------------------- training
    def train_step(self, x: torch.Tensor, y: torch.Tensor, keys: List[int],
                   generator: torch.Generator) -> Dict[str, float]:
        """One optimiser step on batch ``x (B, ...)``, ``y (B,)``; ``keys`` are the ``B`` sample indices.

        Returns the batch loss and, for adv / ima, how many samples the attack pushed across.
        """
        c = self.config
        stats = {}
        if c.method == "ce":
            loss = F.cross_entropy(self.model(x), y)
        elif c.method == "adv":
            adversarial = self.adversarial_step(self.model, x, y, generator)
            logits_adv = self.model(adversarial.x)
            # The segmentation baseline's loss (METHOD section 5): clean and adversarial halves.
            loss = (F.cross_entropy(self.model(x), y) + F.cross_entropy(logits_adv, y)) / 2
            stats["adv_wrong"] = float((logits_adv.argmax(1) != y).sum())
        elif c.method in BASELINES:
            context = BatchContext(self.model, c, self.epoch, self.data.clamp, generator)
            loss, stats = BASELINES[c.method](context, x, y)
        else:
            loss, stats = self._ima_step(x, y, keys, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        stats["loss_sum"] = float(loss.detach()) * len(y)
        return stats

    def _ima_step(self, x, y, keys, generator):
        """METHOD section 3: BPGD at each correct sample's margin, ``ima_loss``, margin records."""
        logits = self.model(x)
        clean_loss = F.cross_entropy(logits, y, reduction="none")
        adversarial = self.adversarial_step(self.model, x, y, logits.detach(), keys, self.margins,
                                            generator)
        adv_loss = F.cross_entropy(self.model(adversarial.x), adversarial.target,
                                   reduction="none") if adversarial.x.shape[0] \
            else clean_loss.new_zeros(0)
        evidence = adversarial.evidence
        evidence.record(self.margins)
        return (ima_loss(clean_loss, adv_loss, self.config.ima.beta),
                {"crossed": float(evidence.crossed_correct)})

    def train_epoch(self) -> dict:
        """One pass over the training samples; returns the epoch's history row."""
        c = self.config
        started = time.perf_counter()
        self.model.train()
        order = torch.randperm(self.n_train, generator=epoch_generator(c.seed, self.epoch, 0))
        attack_generator = epoch_generator(c.seed, self.epoch, 1)
        totals: Dict[str, float] = {}
        for start in tqdm(range(0, self.n_train, c.batch_size), leave=False,
                          desc=f"epoch {self.epoch + 1}/{c.epochs}", disable=not self.progress):
            idx = order[start:start + c.batch_size]
            x = as_float(self.data.x_train[idx]).to(self.device)
            y = self.data.y_train[idx].to(self.device)
            for k, v in self.train_step(x, y, idx.tolist(), attack_generator).items():
                totals[k] = totals.get(k, 0.0) + v
        train = evaluate_clean(self.model, self.data.x_train[:self.n_train],
                               self.data.y_train[:self.n_train], self.device)
        val = evaluate_clean(self.model, self.data.x_val, self.data.y_val, self.device)
        row = {"epoch": self.epoch + 1, "loss": totals["loss_sum"] / self.n_train,
               "train_acc": train["acc"], "val_acc": val["acc"], "val_loss": val["loss"]}
        row.update(_attack_statistics(totals, self.n_train, c.method))
        if self.margins is not None:
            stats = self.margins.end_epoch()
            row.update(mean_margin=stats.margin_mean, median_margin=stats.margin_median,
                       fraction_crossed=totals["crossed"] / self.n_train,
                       fraction_expanded=stats.fraction_expanded,
                       fraction_shrunk=stats.fraction_shrunk)
        row["seconds"] = time.perf_counter() - started
        return row

    def run(self, resume: Optional[bool] = None) -> List[dict]:
        """Train to ``config.epochs`` and write every output; returns the history.

        ``resume``: ``None`` continues automatically when ``out`` holds a checkpoint, ``True``
        requires one, ``False`` refuses to overwrite one.
        """
        latest = os.path.join(self.out, LATEST)
        if os.path.isfile(latest):
            if resume is False:
                raise UserInputError(f"{self.out} already holds a run; drop --no-resume to continue "
                                     f"it or choose another -o")
            self.load_checkpoint(latest)
            print(f"resuming {self.out} after epoch {self.epoch}", flush=True)
        elif resume:
            raise UserInputError(f"--resume: {latest} does not exist, nothing to resume")
        os.makedirs(self.out, exist_ok=True)
        write_json(os.path.join(self.out, "config.json"), self.config.to_dict(), sort_keys=False)
        while self.epoch < self.config.epochs:
            row = self.train_epoch()
            self.epoch += 1
            self.history.append(row)
            save_torch(self.state(), latest)
            if self.save_every and self.epoch % self.save_every == 0:
                save_torch(self.state(), os.path.join(self.out, f"checkpoint_epoch_{self.epoch}.pt"))
            self.write_reports(plots=time.monotonic() - self._last_plot >= PLOT_INTERVAL_S)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in row.items()), flush=True)
        save_torch({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                    "config": self.config.to_dict(), "epoch": self.epoch},
                   os.path.join(self.out, FINAL))
        self.write_reports()
        return self.history

    def write_reports(self, plots: bool = True) -> None:
        """``history.csv``, ``curves.png`` and, for IMA, ``margins.json`` and ``margins_hist.png``."""
        from nnunet_ima.classification.plots import plot_curves, plot_margins
        if plots:
            self._last_plot = time.monotonic()
        if self.history:
            columns = list(dict.fromkeys(k for row in self.history for k in row))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
            write_text(os.path.join(self.out, "history.csv"), buffer.getvalue())
        if self.history and plots:
            plot_curves(self.history, os.path.join(self.out, "curves.png"),
                        f"{self.config.dataset}, {self.config.method}")
        if self.margins is not None:
            write_json(os.path.join(self.out, "margins.json"), self.margins.state_dict(),
                       sort_keys=False)
        if self.margins is not None and plots:
            plot_margins(self.margins.values(), self.margins.eps_max,
                         os.path.join(self.out, "margins_hist.png"))
