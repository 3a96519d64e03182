"""Atomic file writes: a file is complete or absent, never half written (a kill mid-write or a
concurrent reader sees the previous version); :func:`read_json`, whose error names the file;
:func:`file_sha256`; and :func:`check_output_folder`, which every command calls on its output
folder before it starts any work."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from nnunet_ima.errors import UserInputError


def replace_atomically(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """``write(tmp)`` to a per-process temporary file beside ``path``, then rename it over
    ``path``. If either step fails (a full disk, a folder where the file should go, Ctrl-C),
    the temporary file is removed: no failure leaves a ``*.tmp`` behind.

    ``suffix`` ends the temporary name (``.tmp.png`` lets matplotlib infer the format).
    """
    tmp = f"{path}.{os.getpid()}{suffix}"  # per process: concurrent writers never clash
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (its folder created if missing) atomically, as UTF-8 bytes
    exactly as given: no locale encoding, no newline translation (a ``csv`` writer's line ends
    stay as it wrote them)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    replace_atomically(path, write)


def write_json(path: str, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; ``sort_keys=False`` keeps the
    order of the dicts (a report whose keys follow the attacks run, say)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str, remedy: str = "") -> Any:
    """The JSON content of ``path``. A missing, unreadable or malformed file is a
    :class:`UserInputError` that names the file and ends with ``remedy`` (how to fix it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise UserInputError(f"cannot read {path} ({e})" + (f"; {remedy}" if remedy else "")) \
            from None


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints, final models)."""
    import torch  # here, so that the other writers load without torch
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


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
