"""Atomic file writes: a file is complete or absent, never half written (a kill mid-write or a
concurrent reader sees the previous version); and :func:`check_output_folder`, which every
command calls on its output folder before it starts any work."""
from __future__ import annotations

import json
import os
from typing import Any

from nnunet_ima.errors import UserInputError


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a per-process temporary file, then rename it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_output_folder(path: str, option: str) -> None:
    """Refuse, with a :class:`UserInputError` naming ``option``, an output folder that cannot be
    used: an existing file, a path below a file, or a place this user cannot write to.

    Creates nothing: a command that fails later must not leave an empty folder behind. A folder
    that does not exist yet is fine when its nearest existing parent is a writable folder.
    """
    if not path:
        raise UserInputError(f"{option} is empty; give a folder")
    target = os.path.abspath(path)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise UserInputError(f"{option} {path} is a file, not a folder; give a folder (it is "
                                 f"created if missing)")
        if not os.access(target, os.W_OK | os.X_OK):
            raise UserInputError(f"{option} {path}: no permission to write in this folder; "
                                 f"choose another")
        return
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserInputError(f"{option} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} {path} cannot be created: no permission to write in "
                             f"{parent}; choose another folder")
