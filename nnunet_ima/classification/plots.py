"""Accuracy curves (the paper's Figures 8-10) and the margin histogram of a run."""
from __future__ import annotations

import os
from typing import List

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_accuracy(history: List[dict], path: str, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax.plot(epochs, [r["val_acc"] for r in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_margins(margins: np.ndarray, eps_max: float, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if margins.size:
        ax.hist(margins, bins=np.linspace(0, eps_max, 31))
    ax.set_xlabel("estimated margin")
    ax.set_ylabel("training samples")
    ax.set_title(f"IMA margins ({margins.size} samples)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
