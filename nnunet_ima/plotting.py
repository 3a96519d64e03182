"""Matplotlib without a display, and figures written atomically (a kill never leaves half a PNG)."""
from __future__ import annotations

from nnunet_ima.io import replace_atomically


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Save ``fig`` to ``path`` through a temporary file, then close it."""
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi), suffix=".tmp.png")
    finally:
        pyplot().close(fig)
