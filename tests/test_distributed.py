"""Margins recorded on two gloo ranks are merged so that both ranks hold the same margins."""
import json
import os
import socket

import torch.multiprocessing as mp

from nnunet_ima.distributed import merge_margin_records
from nnunet_ima.margins import MarginStore

# rank -> records (keys, crossed, distance, clean_correct); ("c", 1) is seen by both ranks
RECORDS = {
    0: ([("a", 0), ("c", 1)], [True, True], [0.02, 0.08], [True, True]),
    1: ([("b", 5), ("c", 1), ("d", 2)], [False, True, False], [0.0, 0.04, 0.0], [True, True, False]),
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        store = MarginStore(eps_max=1.0, delta=0.1)
        store.record(*RECORDS[rank])
        merge_margin_records(store)
        store.end_epoch()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(store.state_dict(), f)
    finally:
        dist.destroy_process_group()


def test_two_rank_merge_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] == states[1]
    single = MarginStore(eps_max=1.0, delta=0.1)
    for rank in (0, 1):
        single.record(*RECORDS[rank])
    single.end_epoch()
    assert MarginStore.from_state_dict(states[0]).state_dict() == single.state_dict()
    merged = MarginStore.from_state_dict(states[0])
    assert abs(merged.margin(("c", 1)) - (0.06 + 0.1) / 2) < 1e-12  # mean of both ranks' distances


def test_merge_is_a_no_op_without_a_process_group():
    store = MarginStore(eps_max=1.0, delta=0.1)
    store.record(*RECORDS[0])
    assert merge_margin_records(store) == 2
