"""Margin synchronisation across DDP ranks.

Under DDP every rank samples different slices, so every rank records a different part of an
epoch. Before the epoch-end update each rank gathers all ranks' records (in rank order, so
that every rank averages duplicate records in the same order and gets bit-identical margins).
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch.distributed as dist

from nnunet_ima.margins import MarginStore


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any, group: Optional[dist.ProcessGroup] = None) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` outside DDP)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def merge_margin_records(store: MarginStore, group: Optional[dist.ProcessGroup] = None) -> int:
    """Replace this rank's pending records by the union of every rank's, in rank order.

    Call on every rank before :meth:`MarginStore.end_epoch`; afterwards all ranks hold the same
    margins. A no-op outside DDP. Returns the number of records now pending.
    """
    if not is_distributed():
        return sum(len(v) for v in store.pending_records().values())
    gathered = gather_objects(store.pending_records(), group)
    store.clear_records()
    for records in gathered:
        store.add_records(records)
    return sum(len(v) for v in store.pending_records().values())
