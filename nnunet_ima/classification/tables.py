"""The robustness table and curves of several classification runs (rows = runs, columns =
noise levels, as the paper's tables)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from nnunet_ima.classification.strong_attacks import caption


def markdown_table(rows: List[Tuple[str, dict]], norm: str, steps: int, attacks: Sequence[str]) -> str:
    """One row per run, one column per noise level (robust accuracy in %), then the AUC.

    The caption names the attacks run; a cell where PGD was more than 2 points above a stronger
    attack (``report["warnings"]``) carries a footnote mark ``[^k]`` explained below the table.
    """
    levels = sorted({float(n) for _, report in rows for n in report["noise"]})
    header = "| run | n | " + " | ".join(f"{norm.upper()} {n:g}" for n in levels) + " | AUC |"
    lines = [f"Robust accuracy (%), worst case of: {caption(attacks, steps)}",
             "", header, "|---|---:|" + "---:|" * (len(levels) + 1)]
    notes = []
    for name, report in rows:
        flagged = {f"{w['noise']:g}": w for w in report.get("warnings", [])}
        cells = []
        for n in levels:
            key = f"{n:g}"
            cell = f"{100 * report['noise'][key]:.2f}" if key in report["noise"] else ""
            if key in flagged:
                notes.append(flagged[key]["message"])
                cell += f" [^{len(notes)}]"
            cells.append(cell)
        auc = f"{100 * report['auc']:.2f}" if report["auc"] is not None else ""
        lines.append(f"| {name} | {report['n']} | " + " | ".join(cells) + f" | {auc} |")
    if notes:
        lines.append("")
        lines.extend(f"[^{k}]: {note}" for k, note in enumerate(notes, start=1))
    return "\n".join(lines) + "\n"


def plot_robustness_curves(rows: Sequence[Tuple[str, dict]], norm: str, path: str, title: str) -> None:
    """Robust accuracy (%) against noise level, one line per run (the paper's Figures 5-7 style)."""
    from nnunet_ima.plotting import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lowest = 100.0
    for name, report in rows:
        levels = sorted(report["noise"], key=float)
        ax.plot([float(n) for n in levels], [100 * report["noise"][n] for n in levels],
                marker="o", label=f"{name} (AUC {100 * report['auc']:.1f})"
                if report.get("auc") is not None else name)
        lowest = min([lowest] + [100 * report["noise"][n] for n in levels])
    ax.set_xlabel(f"{norm.upper()} noise level")
    ax.set_ylabel("robust accuracy (%)")
    # From the 10 % step below the lowest value: robust methods differ by a few points, which a
    # 0-100 axis would flatten.
    ax.set_ylim(10 * int(max(lowest - 1, 0) // 10), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
