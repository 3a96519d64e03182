"""Training curves (clean accuracy per epoch, as in the paper's Figures 8-10) and the margin
histogram of an IMA run. Matplotlib with the Agg backend; files written atomically."""
from __future__ import annotations

from typing import List

import numpy as np

from nnunet_ima.plotting import pyplot as _pyplot, save_figure


def _save(fig, path: str) -> None:
    save_figure(fig, path, dpi=90)


def plot_curves(history: List[dict], path: str, title: str) -> None:
    """Train / validation accuracy and loss per epoch; the mean (and, for IMA, median) margin
    estimate in a third panel for IMA and MMA."""
    plt = _pyplot()
    has_margin = "mean_margin" in history[-1]
    fig, axes = plt.subplots(1, 3 if has_margin else 2, figsize=(12 if has_margin else 8, 3.6))
    epochs = [r["epoch"] for r in history]
    axes[0].plot(epochs, [r["train_acc"] for r in history], label="train")
    axes[0].plot(epochs, [r["val_acc"] for r in history], label="validation")
    axes[0].set_ylabel("clean accuracy")
    axes[1].plot(epochs, [r["loss"] for r in history], label="training loss (method's)")
    axes[1].plot(epochs, [r["val_loss"] for r in history], label="validation cross-entropy")
    axes[1].set_ylabel("loss")
    if has_margin:
        axes[2].plot(epochs, [r["mean_margin"] for r in history], label="mean")
        if "median_margin" in history[-1]:
            axes[2].plot(epochs, [r["median_margin"] for r in history], label="median")
        axes[2].set_ylabel("estimated margin")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_margins(margins: np.ndarray, eps_max: float, path: str) -> None:
    """Histogram of the estimated margins ``(N,)`` over ``[0, eps_max]``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if margins.size:
        ax.hist(margins, bins=np.linspace(0, eps_max, 31))
    ax.set_xlabel("estimated margin")
    ax.set_ylabel("training samples")
    ax.set_title(f"IMA margins ({margins.size} samples, eps_max {eps_max:g})")
    fig.tight_layout()
    _save(fig, path)
