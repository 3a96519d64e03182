"""Margins saved beside nnU-Net checkpoints, so that ``nnUNetv2_train ... --c`` restores them.

nnU-Net's ``save_checkpoint`` has no hook for extra state, so the margins of
``checkpoint_latest.pth`` live in ``checkpoint_latest.margins.json``. The file is written
atomically *before* the checkpoint and holds the states of the two most recent saves, each
tagged with the checkpoint's ``current_epoch``: a crash between the two writes leaves the old
checkpoint beside a file that still holds the old checkpoint's margins, and loading picks the
state whose epoch matches the checkpoint. The margins are therefore exactly those of the
checkpoint the run continues from.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import read_json, write_text
from nnunet_ima.margins import MarginStore

FORMAT_VERSION = 1


def margins_path(checkpoint_path: str) -> str:
    """``.../checkpoint_latest.pth`` -> ``.../checkpoint_latest.margins.json``."""
    root, _ = os.path.splitext(checkpoint_path)
    return root + ".margins.json"


def _read(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def save_margins(checkpoint_path: str, store: MarginStore, current_epoch: int) -> str:
    """Write ``store`` for the checkpoint about to be saved at ``checkpoint_path``."""
    path = margins_path(checkpoint_path)
    states = []
    if os.path.isfile(path):
        try:
            states = [s for s in _read(path).get("states", [])
                      if s["current_epoch"] != current_epoch][-1:]
        except (ValueError, KeyError):
            states = []  # an unreadable old file only loses the fallback state
    states.append({"current_epoch": int(current_epoch), "margins": store.state_dict()})
    write_text(path, json.dumps({"format": FORMAT_VERSION, "states": states}))
    return path


def load_margins(checkpoint_path: str, current_epoch: int) -> MarginStore:
    """The margins saved with the checkpoint whose ``current_epoch`` is given.

    Raises:
        UserInputError: no margins file, one that cannot be read (truncated, not JSON, entries
            missing), or none for this epoch; the message names the file. What the user can do
            instead (another checkpoint, a fresh start) is the trainer's to say.
    """
    path = margins_path(checkpoint_path)
    if not os.path.isfile(path):
        raise UserInputError(f"{path} is missing: the margins of {checkpoint_path} cannot be "
                             f"restored")
    content = read_json(path)
    states = content.get("states") if isinstance(content, dict) else None
    if not isinstance(states, list) or not all(
            isinstance(s, dict) and {"current_epoch", "margins"} <= set(s) for s in states):
        raise UserInputError(f"{path} is not a margins file of this package: it should hold "
                             f"\"states\", a list of {{\"current_epoch\", \"margins\"}}")
    for state in states:
        if state["current_epoch"] == current_epoch:
            try:
                return MarginStore.from_state_dict(state["margins"])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                why = f"the entry {e} is missing" if isinstance(e, KeyError) else str(e)
                raise UserInputError(f"{path}: the margins of epoch {current_epoch} cannot be "
                                     f"restored ({why})") from None
    found = [s["current_epoch"] for s in states]
    raise UserInputError(f"{path} holds margins for checkpoint epochs {found}, not for "
                         f"{current_epoch} (the epoch of {checkpoint_path})")


def remove_margins(checkpoint_path: str) -> None:
    """Delete the margins file of a checkpoint that nnU-Net deleted."""
    path = margins_path(checkpoint_path)
    if os.path.isfile(path):
        os.remove(path)
