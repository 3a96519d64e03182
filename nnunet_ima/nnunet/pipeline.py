"""Run nnU-Net's commands as subprocesses, one at a time or side by side, with logs per command.

Used by the ablation experiment and by :mod:`.experiment` (the demo and the real-lesion
benchmark): every training is a real ``nnUNetv2_train`` process with its own environment (its
``NNUNET_IMA_CONFIG`` file, for the ablation its ``nnUNet_results`` folder).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

from nnunet_ima.errors import UserInputError


def console_script(name: str) -> str:
    """The console script ``name`` of this Python environment (else ``name`` on the PATH)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


@dataclass
class Command:
    """One command: its arguments, the name of its log file and its extra environment."""

    args: List[str]
    log_name: str
    env: Dict[str, str] = field(default_factory=dict)

    def shown(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + " ".join(shlex.quote(a) for a in self.args)


@dataclass
class Finished:
    """A command that ended: its exit code, its log file and how long it ran (seconds)."""

    command: Command
    log_path: str
    returncode: int
    seconds: float


def run_commands(commands: Sequence[Command], log_folder: str, base_env: Dict[str, str],
                 jobs: int = 1, show_output: bool = False, poll_seconds: float = 0.5
                 ) -> Iterator[Finished]:
    """Run ``commands``, at most ``jobs`` at a time; yield each as it ends, whatever the order.

    A command is shown (``$ ...``) when it starts, as soon as a slot is free. Its output goes to
    ``log_folder/<log_name>.log``, or with ``show_output`` to this process's own output. All
    commands run even when one fails; the caller reports the outcomes. Commands still running
    when the caller stops (an error, Ctrl-C) are killed, as :func:`subprocess.run` does.
    """
    if jobs < 1:
        raise UserInputError(f"jobs must be >= 1, got {jobs}")
    os.makedirs(log_folder, exist_ok=True)
    pending = list(commands)
    running = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                command = pending.pop(0)
                print(f"\n$ {command.shown()}", flush=True)
                log_path = os.path.join(log_folder, command.log_name + ".log")
                log = None if show_output else open(log_path, "w")
                process = subprocess.Popen(command.args, env=dict(base_env, **command.env),
                                           stdout=log,
                                           stderr=None if show_output else subprocess.STDOUT)
                running.append((command, log_path, log, process, time.time()))
            for entry in [e for e in running if e[3].poll() is not None]:
                command, log_path, log, process, start = entry
                running.remove(entry)
                if log is not None:
                    log.close()
                yield Finished(command, log_path, process.returncode, time.time() - start)
            if running:
                time.sleep(poll_seconds)
    finally:
        for _, _, log, process, _ in running:
            process.kill()
            process.wait()
            if log is not None:
                log.close()


def run_side_by_side(commands: List[Command], log_folder: str, base_env: Dict[str, str],
                     jobs: int = 1, poll_seconds: float = 0.5) -> None:
    """Run ``commands``, at most ``jobs`` at a time, each writing ``log_folder/<log_name>.log``.

    A command is started as soon as a slot is free; each is reported when it ends, whatever the
    order. All commands run even when one fails; then one error names every failure and its log.
    """
    failures = []
    for finished in run_commands(commands, log_folder, base_env, jobs, poll_seconds=poll_seconds):
        name = finished.command.log_name
        if finished.returncode != 0:
            failures.append(f"{name} failed (exit {finished.returncode}); see "
                            f"{finished.log_path}")
            print(f"  {name}: FAILED (exit {finished.returncode})", flush=True)
        else:
            print(f"  {name}: done in {finished.seconds:.0f} s", flush=True)
    if failures:
        raise UserInputError("; ".join(failures))


def threads_per_job(jobs: int, cores: Optional[int] = None) -> int:
    """CPU threads each of ``jobs`` concurrent trainings gets (at least 1).

    Given as ``OMP_NUM_THREADS``, it reaches libraries that read the variable; torch's own thread
    count is set by ``nnUNetv2_train`` itself (all cores with ``-device cpu``, one with
    ``-device cuda``), whatever the variable says.
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def data_augmentation_workers(device: str, jobs: int) -> str:
    """``nnUNet_n_proc_DA`` of each of ``jobs`` concurrent trainings.

    On a CPU 0: augment in the main process, where the cores are busy with the network anyway,
    and where a seeded training draws the same batches in the same order every time. On a GPU the
    CPU cores shared by the trainings, less one for the training process itself: nnU-Net's
    workers hand out batches in the order they finish them and seed themselves from the system,
    so a seeded GPU training is not repeatable (nor is cuDNN's autotuning, which nnU-Net turns on).
    """
    if device == "cpu":
        return "0"
    return str(max(1, (os.cpu_count() or 2) // max(1, jobs) - 1))
