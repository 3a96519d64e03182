"""Run nnU-Net's commands as subprocesses, one at a time or side by side, with logs per command.

Used by the ablation experiment: every training is a real ``nnUNetv2_train`` process with its own
environment (its ``nnUNet_results`` folder and ``NNUNET_IMA_CONFIG`` file).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

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


def run_side_by_side(commands: List[Command], log_folder: str, base_env: Dict[str, str],
                     jobs: int = 1, poll_seconds: float = 0.5) -> None:
    """Run ``commands``, at most ``jobs`` at a time, each writing ``log_folder/<log_name>.log``.

    A command is started as soon as a slot is free; each is reported when it ends, whatever the
    order. All commands run even when one fails; then one error names every failure and its log.
    """
    if jobs < 1:
        raise UserInputError(f"jobs must be >= 1, got {jobs}")
    os.makedirs(log_folder, exist_ok=True)
    pending = list(commands)
    running = []
    failures = []
    while pending or running:
        while pending and len(running) < jobs:
            command = pending.pop(0)
            print(f"\n$ {command.shown()}", flush=True)
            log_path = os.path.join(log_folder, command.log_name + ".log")
            log = open(log_path, "w")
            process = subprocess.Popen(command.args, env=dict(base_env, **command.env),
                                       stdout=log, stderr=subprocess.STDOUT)
            running.append((command, log_path, log, process, time.time()))
        for entry in [e for e in running if e[3].poll() is not None]:
            command, log_path, log, process, start = entry
            running.remove(entry)
            log.close()
            if process.returncode != 0:
                failures.append(f"{command.log_name} failed (exit {process.returncode}); see "
                                f"{log_path}")
                print(f"  {command.log_name}: FAILED (exit {process.returncode})", flush=True)
            else:
                print(f"  {command.log_name}: done in {time.time() - start:.0f} s", flush=True)
        if running:
            time.sleep(poll_seconds)
    if failures:
        raise UserInputError("; ".join(failures))


def threads_per_job(jobs: int, cores: Optional[int] = None) -> int:
    """CPU threads each of ``jobs`` concurrent trainings gets (at least 1)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, jobs))
