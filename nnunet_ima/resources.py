"""Memory and disk checks that the drivers (``demo``, ``ablation``, ``make-synthetic``) make
before any work: a request that cannot fit is refused with the numbers, instead of a
``MemoryError`` or a full disk half way through, with half-written folders left behind.

The estimates are the drivers' own (measured on their data); this module only compares them with
what the machine has and words the refusal.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from nnunet_ima.errors import UserInputError

GIB = 1024 ** 3


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"``; binary units, one decimal, up to exabytes."""
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1024 or unit == "PB":
            break
        value /= 1024
    if unit == "PB" and value >= 1024:  # absurd requests are still one readable number
        return f"{value / 1024:.3g} EB"
    return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def available_memory() -> Optional[int]:
    """Memory a new allocation can get without swapping, in bytes (Linux ``MemAvailable``,
    else the free physical pages); ``None`` where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file gives kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: str) -> int:
    """Free bytes on the file system that ``path`` is (or, not created yet, will be) on."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse when ``needed`` bytes exceed the available memory.

    ``what`` says what needs it (``"one case of --shape 100000 100000 100000"``), ``fix`` how
    to need less. Nothing is refused where the system does not report its memory.
    """
    available = available_memory()
    if available is not None and needed > available:
        raise UserInputError(f"{what} needs about {human_bytes(needed)} of memory, but "
                             f"{human_bytes(available)} is available; {fix}")


def check_disk(path: str, needed: int, what: str, fix: str) -> None:
    """Refuse when ``needed`` bytes exceed the free space of ``path``'s file system."""
    free = free_disk(path)
    if needed > free:
        raise UserInputError(f"{what} needs about {human_bytes(needed)} of disk in {path}, but "
                             f"{human_bytes(free)} is free; {fix}")
