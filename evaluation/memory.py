"""The peak memory of an evaluation's attacks, as ``summary.json`` reports it per model.

A 3D attack holds the activations of every tile of a volume for its backward pass, so memory,
not time, decides whether a volume can be audited on a given GPU. :func:`measure_peak` wraps
the attacks of one model:

* on CUDA: ``torch.cuda.max_memory_allocated`` of the device, its peak reset when the model's
  attacks start (the tensors PyTorch allocated; the caching allocator and the CUDA context take
  somewhat more, which ``nvidia-smi`` shows);
* on a CPU: the peak resident set size of the process (``VmHWM``), reset when the model's
  attacks start where Linux allows it (``/proc/self/clear_refs``), else the peak since the
  process started (``getrusage``), which then includes what ran before (``"since"`` says which).

The numbers are measurements, not results: two runs of the same evaluation differ in them, a
resumed run measures only what it computed, and they are kept out of the parts and out of what
a resumed or merged run compares.
"""
from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _peak_rss_kib() -> Optional[int]:
    """``VmHWM`` of ``/proc/self/status`` in KiB; ``None`` where there is no such file."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0: ``5`` into
    ``clear_refs``); whether it worked."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rusage_peak_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


@contextmanager
def measure_peak(device: torch.device, into: Dict[str, dict], key: str) -> Iterator[None]:
    """Measure the peak memory of the block and store it as ``into[key]``: ``{"bytes",
    "gib", "device", "measure", "since"}`` (see the module docstring); also when the block
    raises, so that an interrupted run has measured what it did."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        since = "start of the attacks"
    else:
        since = "start of the attacks" if _reset_peak_rss() else "start of the process"
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = int(torch.cuda.max_memory_allocated(device))
            measure = "torch.cuda.max_memory_allocated"
        else:
            kib = _peak_rss_kib() if since == "start of the attacks" else None
            peak = kib * 1024 if kib is not None else _rusage_peak_bytes()
            measure = "peak resident set size of the process"
        into[key] = {"bytes": peak, "gib": round(peak / 2 ** 30, 3), "device": str(device),
                     "measure": measure, "since": since}

