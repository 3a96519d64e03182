"""One evaluation at a time per output folder: :func:`output_lock`.

Two evaluations writing into the same ``-o`` mix their results: the second one's ``config.json``
labels the first one's parts. The lock is an exclusive ``fcntl.flock`` on ``OUT/`` +
:data:`LOCK_FILENAME`, which holds the holder's pid, host, start time and command line so that a
refused evaluation can name it. The kernel drops a ``flock`` when its process ends, however it
ends (Ctrl-C, an error, ``kill -9``), so a lock file left behind by a dead process is stale by
construction and is simply taken over. On file systems without ``flock`` (some cluster file
systems answer ``ENOLCK`` / ``ENOSYS``) the file's record is the lock: a record naming a live
process of this host refuses, any other is taken over (a best effort: there two evaluations
that start in the same instant can both pass).
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from nnunet_ima.errors import UserInputError

try:
    import fcntl
except ImportError:  # Windows: only the record is checked
    fcntl = None

LOCK_FILENAME = "nnunet-ima-eval.lock"

# flock is not available on this file system (not "someone else holds it").
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)}


def holder_record(command: Optional[str] = None) -> dict:
    """What the lock file says about this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "started_unix": time.time(),
            "command": command if command is not None else shlex.join(sys.argv)}


def _read_record(path: str) -> dict:
    """The lock file's record; ``{}`` when it is empty or unreadable (a holder that has not
    written it yet, or a file of another program)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _process_alive(pid) -> bool:
    """Whether process ``pid`` of this host runs (a process of another user counts)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    return True


def busy_message(folder: str, record: dict) -> str:
    """The refusal: who holds ``folder`` and since when, and the two ways out."""
    path = os.path.join(folder, LOCK_FILENAME)
    if not record.get("pid"):
        who = f"another nnunet-ima-eval (it holds {path})"
    else:
        since = record.get("started", "an unknown time")
        started = record.get("started_unix")
        if isinstance(started, (int, float)):
            since += f", {max(0, int(time.time() - started)) // 60} min ago"
        who = (f"another evaluation: pid {record['pid']} on {record.get('host', 'an unknown host')}"
               f", running since {since}: {record.get('command', '(command unknown)')}")
    return (f"{folder} is in use by {who}. One evaluation at a time per output folder (two "
            f"would mix their results): wait for it to finish, or stop it, or choose another -o")


def _created_folders(folder: str) -> Optional[str]:
    """Create ``folder`` (and missing parents); returns the topmost folder created, ``None``
    when ``folder`` existed."""
    target = os.path.abspath(folder)
    top = None
    probe = target
    while not os.path.exists(probe):
        top = probe
        probe = os.path.dirname(probe)
    os.makedirs(target, exist_ok=True)
    return top


def _remove_if_empty(folder: str, top: Optional[str]) -> None:
    """Remove the empty folders from ``folder`` up to ``top`` (the ones :func:`_created_folders`
    made): an evaluation refused before it wrote anything leaves nothing behind."""
    if top is None:
        return
    current = os.path.abspath(folder)
    while True:
        try:
            os.rmdir(current)  # only succeeds on an empty folder
        except OSError:
            return
        if current == top:
            return
        current = os.path.dirname(current)


def _flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting: ``True`` taken, ``False`` another
    process holds it. Raises ``OSError`` (errno in :data:`_NO_FLOCK`) where flock is missing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _acquire(folder: str, record: dict) -> Optional[int]:
    """Lock ``folder``; returns the open lock file (``None`` where only the record locks)."""
    path = os.path.join(folder, LOCK_FILENAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            taken = _flock(fd) if fcntl is not None else None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise UserInputError(f"cannot lock {path} ({e}); choose another -o") from None
            taken = None
        if taken is False:
            os.close(fd)
            raise UserInputError(busy_message(folder, _read_record(path)))
        if taken is None:  # no flock here: the record is the lock
            os.close(fd)
            held = _read_record(path)
            if (held.get("host") == record["host"] and held.get("pid") != record["pid"]
                    and _process_alive(held.get("pid"))):
                raise UserInputError(busy_message(folder, held))
            _write_record(path, record)
            return None
        # A holder that released between our open() and flock() has deleted the file we
        # locked; lock the path's current file instead.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            return fd
        os.close(fd)


def _write_record(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f)


@contextmanager
def output_lock(folder: str, command: Optional[str] = None) -> Iterator[str]:
    """Hold the lock of output folder ``folder`` (created if missing) for the ``with`` block;
    yields the lock file's path. Released, and the lock file removed, however the block ends
    (return, error, Ctrl-C); a folder created here is removed again if it is still empty.

    Raises:
        UserInputError: another evaluation holds ``folder`` (the message names its pid, host,
            command and start time).
    """
    top = _created_folders(folder)
    path = os.path.join(folder, LOCK_FILENAME)
    try:
        fd = _acquire(folder, holder_record(command))
    except BaseException:
        _remove_if_empty(folder, top)
        raise
    try:
        yield path
    finally:
        # Delete before unlocking: a process that opened the old file meanwhile sees that it
        # is no longer the path's file and starts again (see _acquire).
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        if fd is not None:
            os.close(fd)  # drops the flock
        _remove_if_empty(folder, top)
