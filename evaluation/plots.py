"""``curves.png`` (Dice vs noise per model) and ``examples.png`` (the paper's Figures 12-14)."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from nnunet_ima.plotting import pyplot, save_figure

from nnunet_ima.evaluation.report import noise_key
from nnunet_ima.evaluation.robustness import NoiseResult




def plot_curves(summary: dict, noise_levels: Sequence[float], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("tvdi", "adi")):
        for name, entry in summary["models"].items():
            ax.plot(noise_levels, [entry["noise"][noise_key(n)][metric] for n in noise_levels],
                    marker="o", label=name)
        ax.set_xlabel(f"noise level ({summary['config']['norm'].upper()})")
        ax.set_title(metric.upper())
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_examples(results: Dict[str, Dict[float, NoiseResult]], noise_levels: Sequence[float],
                  path: str) -> None:
    """Per model and noise level: the (attacked) input, its prediction, and the ground truth."""
    plt = pyplot()
    models = list(results)
    cols = len(noise_levels) * 2 + 1
    fig, axes = plt.subplots(len(models), cols, figsize=(1.8 * cols, 2.0 * len(models)),
                             squeeze=False)
    vmax = None
    for row, model in enumerate(models):
        for k, noise in enumerate(noise_levels):
            example = results[model][noise].example
            if not example:
                continue
            image = example["adversarial"][0]
            if vmax is None:
                vmax = float(np.percentile(np.abs(example["image"][0]), 99.5)) or 1.0
            axes[row, 2 * k].imshow(image, cmap="gray", vmin=-vmax, vmax=vmax)
            axes[row, 2 * k].set_title(f"input, noise {noise_key(noise)}", fontsize=7)
            axes[row, 2 * k + 1].imshow(example["prediction"], cmap="viridis",
                                        vmin=0, vmax=max(int(example["label"].max()), 1))
            axes[row, 2 * k + 1].set_title("prediction", fontsize=7)
        label = results[model][noise_levels[0]].example.get("label")
        if label is not None:
            axes[row, -1].imshow(label, cmap="viridis", vmin=0, vmax=max(int(label.max()), 1))
            axes[row, -1].set_title("ground truth", fontsize=7)
        axes[row, 0].set_ylabel(model, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)
