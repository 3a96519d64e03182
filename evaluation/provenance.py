"""What produced a result: the identity of a checkpoint and the record each part carries.

A part (one model, noise level and, under an ensemble, member) is reused by a later run only if
its record equals the one this run would write: the attack settings, the model and its
checkpoint's digest, the noise level, the member and the members before it, and the test slices
(their ``(case, slice)`` list and a digest of their pixels and labels). ``config.json`` says what
a folder *should* hold; the records say what each part *does* hold, so a part written by another
evaluation (one of other settings that wrote into the folder, a file copied from another model's
folder, a part of a version without records) is recomputed instead of being reported under this
run's label. A checkpoint's size and modification time are kept in the record for the reader;
its identity is compared by path and sha256 (a copy with the same bytes is the same weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import file_sha256

from nnunet_ima.evaluation.samples import SliceSample

RECORD_VERSION = 1

# Entries of a model's configuration that footnote the tables but do not change a number.
NOT_COMPARED = ("train_cases_scored", "training_cases_note")


def compared_models(config: dict) -> Dict[str, dict]:
    """``config``'s model entries without the :data:`NOT_COMPARED` footnote entries: what a
    result of each model depends on."""
    return {name: {k: v for k, v in entry.items() if k not in NOT_COMPARED}
            for name, entry in config.get("models", {}).items()}


def compared_config(config: dict) -> dict:
    """``config`` with :func:`compared_models`: a rerun whose configuration differs from the
    folder's only in a footnote (a rewritten split of a model that has a training record, say)
    resumes, and its ``config.json`` then carries the new footnote."""
    return {**config, "models": compared_models(config)} if "models" in config else config

# Per run, (path, size, mtime_ns, inode) -> sha256: a checkpoint named by several models of one
# run is read once. evaluate() clears it, so every run hashes what is on disk now.
_HASHES: Dict[Tuple[str, int, int, int], str] = {}


def clear_checkpoint_hashes() -> None:
    """Forget the digests of earlier runs (called at the start of every evaluation)."""
    _HASHES.clear()


def _stat_key(path: str) -> Tuple[str, int, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino


def checkpoint_identity(path: str) -> dict:
    """``{"path", "size", "mtime", "sha256"}`` of a checkpoint file (the digest cached per run
    for an unchanged file)."""
    key = _stat_key(path)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return {"path": key[0], "size": key[1], "mtime": key[2] / 1e9, "sha256": _HASHES[key]}


def check_unchanged(identity: dict, what: str) -> None:
    """Refuse a checkpoint that changed between :func:`checkpoint_identity` and the end of its
    loading: the weights loaded may then not be the ones hashed (a training still writing it)."""
    path = identity["path"]
    try:
        st = os.stat(path)
        same = (st.st_size, st.st_mtime_ns / 1e9) == (identity["size"], identity["mtime"])
    except OSError:
        same = False
    if not same:
        raise UserInputError(f"{path} changed while {what} loaded it (is a training still writing "
                             f"it?); rerun when the file no longer changes")


def slices_digest(samples: Sequence[SliceSample]) -> str:
    """sha256 of the slices' keys, shapes, pixels and labels: the test data a part was computed
    on, so re-preprocessed data under the same case names is not taken for the old one."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.case, int(s.index), list(s.image.shape),
                                  str(s.image.dtype), list(s.label.shape),
                                  str(s.label.dtype)]).encode())
        digest.update(np.ascontiguousarray(s.image).tobytes())
        digest.update(np.ascontiguousarray(s.label).tobytes())
    return digest.hexdigest()


class PartRecords:
    """The records of one run's parts, built from its ``config`` (:func:`.run_config.run_config`,
    which already holds every setting a result depends on) and each model's slices.

    Args:
        config: the run's configuration.
        slices: per model name, the digest of its slices (:func:`slices_digest`).
        checkpoints: per model name, its :func:`checkpoint_identity`.
        produced_by: facts kept for the reader but not compared (device, versions, host, time).
    """

    def __init__(self, config: dict, slices: Dict[str, str], checkpoints: Dict[str, dict],
                 produced_by: Optional[dict] = None):
        # The list of levels and of folds is the run's; a part depends on its own level (and
        # on the model's own fold, which its model entry holds).
        self.settings = {k: v for k, v in config.items() if k not in ("models", "noise", "fold")}
        self.models = compared_models(config)
        self.slices = slices
        self.checkpoints = checkpoints
        self.produced_by = produced_by or {}

    def record(self, model: str, noise: float, member: Optional[str] = None,
               members_before: Sequence[str] = ()) -> dict:
        """The record of one part. ``members_before``: the ensemble members that ran before
        ``member`` at this level (it attacks only the slices they left unbroken)."""
        checkpoint = self.checkpoints[model]
        compared = {"model": dict(self.models[model], name=model,
                                  checkpoint_path=checkpoint["path"]),
                    "settings": self.settings, "noise": float(noise), "member": member,
                    "members_before": list(members_before), "slices_sha256": self.slices[model]}
        # Through JSON, so that tuples and lists, ints and floats compare as they will on disk.
        return json.loads(json.dumps({"version": RECORD_VERSION, "compared": compared,
                                      "checkpoint": checkpoint,
                                      "produced_by": self.produced_by}))


def produced_by(device: str) -> dict:
    """The facts about this run kept in every record but not compared."""
    import torch

    from nnunet_ima import installed_version
    return {"nnunet_ima": installed_version(), "torch": torch.__version__, "device": device,
            "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def differences(old, new, prefix: str = "") -> List[str]:
    """Dotted paths where two JSON values differ, e.g. ``models.IMA.checkpoint_sha256``."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                paths += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return paths
    return [prefix.rstrip(".")]


def record_mismatch(found: Optional[dict], expected: dict) -> Optional[str]:
    """Why a part with record ``found`` is not this run's (``None``: it is)."""
    if not isinstance(found, dict) or "compared" not in found:
        return "it has no record of its settings (written by an older version)"
    if found.get("version") != expected["version"]:
        return f"its record is of version {found.get('version')}"
    changed = differences(found["compared"], expected["compared"])
    return f"differs in {', '.join(changed)}" if changed else None
