"""Atomic file writes: a reader (or a crash) never sees half a file."""
from __future__ import annotations

import json
import os
from typing import Any

import torch


def _temporary(path: str) -> str:
    """A temporary name beside ``path``, its own per process: two processes writing the same
    file (two `compare` calls sharing a folder) never replace each other's half-written file."""
    return f"{path}.{os.getpid()}.tmp"


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = _temporary(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file."""
    tmp = _temporary(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)
