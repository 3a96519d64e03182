"""Matplotlib without a display, and figures written atomically (a kill never leaves half a PNG)."""
from __future__ import annotations

import os


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Save ``fig`` to ``path`` through a temporary file, then close it."""
    tmp = f"{path}.{os.getpid()}.tmp.png"  # per process: concurrent writers never clash
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    pyplot().close(fig)
