"""Atomic file writes: a reader (or a crash) never sees half a file, and a failed write (a full
disk, a folder where the file should go, Ctrl-C) leaves no temporary file behind."""
from __future__ import annotations

import json
from typing import Any

import torch

# nnunet_ima.io's writers use per-process temporary names: two processes writing the same file
# (two `compare` calls sharing a folder) never replace each other's half-written file.
from nnunet_ima.io import replace_atomically, write_text  # noqa: F401  (write_text re-exported)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))
