"""``curves.png`` (Dice vs noise per model, and with ``--minimal-noise`` the survival curve
of the minimal noise) and ``examples.png`` (the paper's Figures 12-14)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnunet_ima.plotting import pyplot, save_figure

from nnunet_ima.evaluation.report import noise_key
from nnunet_ima.evaluation.robustness import NoiseResult


def plot_curves(summary: dict, noise_levels: Sequence[float], path: str,
                minimal_noise: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None) -> None:
    """TVDI and ADI against the noise level, one line per model; with ``minimal_noise`` (per
    model the survival curve ``(e, fraction)`` of :func:`.minimal_noise.survival_curve`) a
    third panel: the fraction of samples whose minimal noise exceeds ``e``, against ``e``."""
    plt = pyplot()
    panels = 2 if minimal_noise is None else 3
    # Dice and the fraction of samples share [0, 1]: one y axis for all panels.
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), sharey=True)
    norm = summary['config']['norm'].upper()
    for ax, metric in zip(axes, ("tvdi", "adi")):
        for name, entry in summary["models"].items():
            ax.plot(noise_levels, [entry["noise"][noise_key(n)][metric] for n in noise_levels],
                    marker="o", label=name)
        ax.set_xlabel(f"noise level ({norm}, {summary['config'].get('attack', 'pgd')})")
        ax.set_title(metric.upper())
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice")
    axes[0].legend(fontsize=8)
    if minimal_noise is not None:
        _plot_minimal_noise(axes[2], summary, minimal_noise, norm)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_minimal_noise(ax, summary: dict, curves: Dict[str, Tuple[np.ndarray, np.ndarray]],
                        norm: str) -> None:
    """The survival curves of the minimal noise, and where the search stopped (censoring)."""
    entries = summary.get("minimal_noise", {})
    censored = False
    for name, (e, fraction) in curves.items():
        line, = ax.step(e, fraction, where="post", label=name)
        if entries.get(name, {}).get("censored_at") is not None:
            ax.axvline(entries[name]["censored_at"], color=line.get_color(), ls=":", lw=0.8,
                       label=None if censored else "censored beyond")
            censored = True
    threshold = next(iter(entries.values()))["threshold"] if entries else None
    ax.set_xlabel(f"noise e ({norm})")
    ax.set_ylabel("fraction with minimal noise > e")
    ax.set_title("minimal noise" + (f" (Dice < {threshold:g})" if threshold else ""))
    if censored:
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)


def _clean_prediction(by_noise: Dict[float, NoiseResult]) -> Optional[np.ndarray]:
    for noise in sorted(by_noise):
        example = by_noise[noise].example
        if "clean_prediction" in example:
            return example["clean_prediction"]
        if noise == 0 and "prediction" in example:
            return example["prediction"]
    return None


def plot_examples(results: Dict[str, Dict[float, NoiseResult]], noise_levels: Sequence[float],
                  path: str) -> None:
    """One row per model: the clean input and its prediction, then the attacked input and its
    prediction at each noise level > 0, then the ground truth (the slice with the most
    foreground; the same slice for every model evaluated on the same slices). For whole cases
    (3D) the case with the most foreground, shown by its slice along ``D`` (axial for scans
    stored as ``(z, y, x)``) with the most foreground; the row names the case and the slice."""
    plt = pyplot()
    models = list(results)
    attacked = [n for n in noise_levels if n > 0]
    cols = 2 + 2 * len(attacked) + 1
    fig, axes = plt.subplots(len(models), cols, figsize=(1.8 * cols, 2.0 * len(models)),
                             squeeze=False)
    for row, model in enumerate(models):
        by_noise = results[model]
        first = by_noise[noise_levels[0]].example
        if not first:
            continue
        label = first["label"]
        num_foreground = by_noise[noise_levels[0]].tp.shape[1]
        classes = dict(cmap="viridis", vmin=0, vmax=max(num_foreground, 1), interpolation="nearest")
        # One grey scale per row, from the clean image, so that the noise is visible as such.
        vmax = float(np.percentile(np.abs(first["image"][0]), 99.5)) or 1.0
        grey = dict(cmap="gray", vmin=-vmax, vmax=vmax)
        panels = [(first["image"][0], grey, "clean input"),
                  (_clean_prediction(by_noise), classes, "clean prediction")]
        for noise in attacked:
            example = by_noise[noise].example
            panels.append((example.get("adversarial", [None])[0], grey,
                           f"noise {noise_key(noise)}"))
            panels.append((example.get("prediction"), classes, "prediction"))
        panels.append((label, classes, "ground truth"))
        for col, (image, style, title) in enumerate(panels):
            if image is not None:
                axes[row, col].imshow(image, **style)
            axes[row, col].set_title(title, fontsize=7)
        where = f"\n{first['case']}, slice {int(first['plane'])}" if "plane" in first else ""
        axes[row, 0].set_ylabel(model + where, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)
