"""Atomic file writes: a reader (or a crash) never sees half a file."""
from __future__ import annotations

import json
import os
from typing import Any

import torch


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
