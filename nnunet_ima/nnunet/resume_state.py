"""The state a training resumes from (``nnUNetv2_train ... --c``), checked before nnU-Net reads it.

After a crash the fold folder is exactly what the user depends on. nnU-Net continues from the
first of ``checkpoint_final.pth``, ``checkpoint_latest.pth``, ``checkpoint_best.pth`` that
exists, and a truncated file there ends in torch's zip error. :func:`checkpoint_problem` finds
such a file before nnU-Net loads it, and :func:`recovery_advice` says which of the other
checkpoints can still be used and how (the trainer adds what belongs to a checkpoint, such as
IMA's margins file).
"""
from __future__ import annotations

import os
import zipfile
from typing import Callable, List, Optional, Sequence

from nnunet_ima.errors import UserInputError

# What nnU-Net's load_checkpoint reads from a checkpoint (nnunetv2 2.8.1).
CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "init_args", "current_epoch", "logging",
                   "_best_ema")
# The order in which nnU-Net's maybe_load_checkpoint looks for a checkpoint to continue from.
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
DAMAGED_SUFFIX = ".damaged"


def _damaged(path: str, why: str) -> UserInputError:
    return UserInputError(f"{path} cannot be read ({why}): it is truncated or damaged, as a crash "
                          f"or a full disk while it was written leaves it")


def checkpoint_epoch(path: str) -> int:
    """The ``current_epoch`` of an nnU-Net checkpoint, after checking that the file is whole.

    The zip archive's CRCs are verified (a truncated or overwritten file fails here) and the
    content is opened memory-mapped, so that a good checkpoint is not read into memory twice.

    Raises:
        UserInputError: naming the file and what is wrong with it.
    """
    import torch  # here: the advice functions are used without torch

    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist")
    try:
        if not zipfile.is_zipfile(path):
            raise _damaged(path, "it is not a complete torch checkpoint" if os.path.getsize(path)
                           else "it is empty")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise _damaged(path, f"the checksum of its part {bad} does not match")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except UserInputError:
        raise
    except Exception as e:  # torch and zipfile raise many types for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _damaged(path, reason[:200]) from None
    if not isinstance(checkpoint, dict):
        raise _damaged(path, f"it holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise _damaged(path, f"it lacks the entries {missing} of an nnU-Net checkpoint")
    return int(checkpoint["current_epoch"])


def recovery_advice(damaged: str, problem: str, train_command: str,
                    problem_of: Callable[[str], Optional[str]],
                    companions: Callable[[str], Sequence[str]] = lambda path: ()) -> str:
    """What to say when ``damaged`` (a checkpoint of a fold folder, or a file belonging to it)
    cannot be resumed from: ``problem``, then the checkpoints that can still be used and the
    exact commands.

    ``problem_of(checkpoint)``: why a checkpoint (with its companions) cannot be used, ``None``
    when it can. ``companions(checkpoint)``: the files that belong to it (IMA: its margins).
    ``train_command``: the ``nnUNetv2_train`` call of this fold, without ``--c``.
    """
    folder = os.path.dirname(os.path.abspath(damaged))
    order = [os.path.join(folder, name) for name in RESUME_ORDER]
    damaged = os.path.abspath(damaged)
    later = order[order.index(damaged) + 1:] if damaged in order else []
    aside: List[str] = [damaged]
    usable, epoch = None, None
    for candidate in later:
        if not os.path.isfile(candidate):
            continue
        if problem_of(candidate) is None:
            usable, epoch = candidate, checkpoint_epoch(candidate)
            break
        aside.append(candidate)
    lines = [problem, "What can still be used:"]
    if usable:
        moves = [p for c in aside for p in [c, *companions(c)] if os.path.exists(p)]
        with_files = [os.path.basename(p) for p in companions(usable)]
        lines.append(f"- {os.path.basename(usable)} (epoch {epoch})"
                     + (f" with {', '.join(with_files)}" if with_files else "")
                     + f": move the damaged files aside and continue from it (--c takes the "
                       f"first of {', '.join(RESUME_ORDER)} that it finds):")
        lines += [f"    mv {p} {p}{DAMAGED_SUFFIX}" for p in moves]
        lines.append(f"    {train_command} --c")
        lines.append("- or start afresh: move the fold folder aside and train without --c:")
    else:
        lines.append("- no other checkpoint of this fold can be resumed from; start afresh: move "
                     "the fold folder aside and train without --c:")
    lines += [f"    mv {folder} {folder}{DAMAGED_SUFFIX}", f"    {train_command}"]
    return "\n".join(lines)
