"""Atomic file writes: a reader (or a crash) never sees half a file, and a failed write (a full
disk, a folder where the file should go, Ctrl-C) leaves no temporary file behind."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch


def _temporary(path: str) -> str:
    """A temporary name beside ``path``, its own per process: two processes writing the same
    file (two `compare` calls sharing a folder) never replace each other's half-written file."""
    return f"{path}.{os.getpid()}.tmp"


def _replace_or_remove(tmp: str, path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)``, then rename ``tmp`` over ``path``; ``tmp`` is removed if either fails."""
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (its folder created if missing) through a temporary file and
    ``os.replace``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    _replace_or_remove(_temporary(path), path, write)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file."""
    _replace_or_remove(_temporary(path), path, lambda tmp: torch.save(obj, tmp))
